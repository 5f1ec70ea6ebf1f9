"""Batches from a token store: random windows for training, a fixed pass for evaluation, and the
corruptions that encoder (masked LM) and encoder-decoder (denoising) pretraining need.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.data.store import TokenStore
from lmforge.errors import LmforgeError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class WindowSampler:
    """Random contiguous windows (x, y=x shifted by one) for causal LM; reproducible and resumable.

    All ranks must use the same seed: each draws the same world_size*batch_size distinct start
    offsets and keeps its own slice, so ranks never train on the same window in a step.
    """

    def __init__(self, store: TokenStore, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(store) < block_size + 1:
            raise LmforgeError(
                f"corpus has {len(store)} tokens, fewer than one context window of block_size+1 = "
                f"{block_size + 1}; lower --block-size (or --seq-len) or add text"
            )
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise LmforgeError(
                f"bad sampler layout: batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        self.store = store
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.n_starts = len(store) - block_size  # a window at start s reads tokens s .. s+block_size
        self._offsets = np.arange(block_size + 1)
        self._rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size, block_size)."""
        total = self.batch_size * self.world_size
        if total <= self.n_starts:
            starts = self._rng.choice(self.n_starts, size=total, replace=False)
        else:  # a corpus smaller than one global batch: repeats are unavoidable
            starts = self._rng.integers(0, self.n_starts, size=total)
        mine = starts[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        windows = np.asarray(self.store.tokens[mine[:, None] + self._offsets], dtype=np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "block_size": self.block_size,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the exact sequence of batches a sampler with the same layout would have drawn."""
        self._rng.bit_generator.state = state["rng"]


def eval_windows(store: TokenStore, block_size: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches (x, y), int64 of shape (<= batch_size, block_size).

    Windows of block_size+1 tokens advance by block_size, so over a full pass every token but
    the first is a target exactly once. The last, shorter window is padded on the right: inputs
    with 0 and targets with -100 (ignored by cross_entropy), so every batch has the same width
    and a causal model's real positions never see the padding. With max_batches, windows are
    taken evenly spread over the whole store rather than from its start.
    """
    tokens = store.tokens
    n_windows = -(-(len(tokens) - 1) // block_size) if len(tokens) > 1 else 0
    picked = np.arange(n_windows)
    if max_batches is not None and n_windows > max_batches * batch_size:
        k = max(max_batches, 0) * batch_size
        picked = (np.arange(k) * n_windows) // k if k else picked[:0]
    for first in range(0, len(picked), batch_size):
        rows = picked[first: first + batch_size]
        x = np.zeros((len(rows), block_size), dtype=np.int64)
        y = np.full((len(rows), block_size), IGNORE_INDEX, dtype=np.int64)
        for row, start in enumerate(rows * block_size):
            chunk = np.asarray(tokens[start: start + block_size + 1], dtype=np.int64)
            x[row, : len(chunk) - 1] = chunk[:-1]
            y[row, : len(chunk) - 1] = chunk[1:]
        yield torch.from_numpy(x), torch.from_numpy(y)


def word_start_table(tokenizer, size: int | None = None) -> torch.Tensor:
    """A (size,) bool table over the vocabulary, True where a token begins a new word: what
    whole-word masking needs, computed once from the token strings so that masking a batch stays
    a table lookup.

    A word is a run of non-space characters together with the whitespace just before it, which
    fits every tokenizer lmforge reads:
    - WordPiece (Hugging Face BERT): every token but the continuations, marked "##";
    - byte-level BPE: a token whose first byte is whitespace (the "Ġ" of " the", the "Ċ" of a newline);
    - char-level: a whitespace character.
    A special token is a word of its own (the token after it starts another, see word_index),
    except a char tokenizer's <unk>: an unknown character belongs to the word around it. Ids past
    the tokenizer's vocabulary (a model's padded vocabulary) never occur in text; they are True.
    """
    from tokenizers import decoders, pre_tokenizers

    inner = tokenizer.inner
    size = max(size or 0, tokenizer.vocab_size)
    model = type(inner.model).__name__
    if model == "WordPiece":
        prefix = inner.model.continuing_subword_prefix

        def starts(token: str) -> bool:
            return not token.startswith(prefix)
    elif tokenizer.kind == "bpe" and isinstance(inner.decoder, decoders.ByteLevel):
        byte_of = inner.decoder  # each of the 256 alphabet characters decodes to its one byte
        spaces = {c for c in pre_tokenizers.ByteLevel.alphabet() if byte_of.decode([c]).isspace()}

        def starts(token: str) -> bool:
            return token[:1] in spaces
    elif tokenizer.kind == "char":
        def starts(token: str) -> bool:
            return token.isspace()
    else:
        raise LmforgeError(f"whole-word masking knows WordPiece, byte-level BPE and char tokenizers; "
                           f"this one is {tokenizer.kind}")
    table = torch.ones(size, dtype=torch.bool)
    specials = set(tokenizer.special_ids)
    for token, i in inner.get_vocab(with_added_tokens=True).items():
        if i not in specials:
            table[i] = starts(token)
    if tokenizer.kind == "char" and tokenizer.unk_id is not None:
        table[tokenizer.unk_id] = False
    return table


def word_index(ids: torch.Tensor, word_starts: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """(batch, T): which word of its row each position belongs to, counting from 0.

    A special token that starts a word also ends it (the text after <|endoftext|> or [SEP] is a new
    word even without a leading space); a window's first token starts a word, even mid-word: the
    rest of that word lies outside the window."""
    starts = word_starts[ids]
    alone = starts & torch.isin(ids, special)
    starts[:, 1:] |= alone[:, :-1]
    starts[:, 0] = True
    return starts.long().cumsum(dim=-1) - 1


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator,
                special_ids: Sequence[int] = (), word_starts: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a (batch, T) tensor: returns (inputs, labels).

    About `prob` of the non-special positions of each row (at least one) are chosen; of those
    80% become mask_id, 10% a random non-special token and 10% stay unchanged, so the model
    cannot learn that only [MASK] positions matter. labels hold the original id at chosen
    positions and -100 elsewhere.

    With `word_starts` (word_start_table), whole words are chosen: each word with probability
    `prob`, so every token is still chosen with probability `prob` (the expected share stays
    `prob`; words are independent, tokens of a word are not), and the 80/10/10 split is then
    drawn per token, as in BERT's own whole-word masking. Without it every token is a word.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype)
    eligible = ~torch.isin(ids, special)
    if word_starts is None:
        words = torch.arange(ids.shape[-1]).expand_as(ids)
    else:
        words = word_index(ids, word_starts, special)
    # One draw per word, read by each of its tokens (word k of a row uses the row's k-th draw).
    chosen = (torch.rand(ids.shape, generator=generator).gather(-1, words) < prob) & eligible
    empty = ~chosen.any(dim=-1) & eligible.any(dim=-1)
    if empty.any():  # force one word in rows the dice left empty: every row then has a loss
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~eligible, -1.0)
        picked_word = words.gather(-1, scores.argmax(dim=-1, keepdim=True))
        chosen |= (words == picked_word) & eligible & empty.unsqueeze(-1)
    action = torch.rand(ids.shape, generator=generator)
    vocab = torch.arange(vocab_size, dtype=ids.dtype)
    allowed = vocab[~torch.isin(vocab, special)]
    random_ids = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


def segment_ids(ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """(batch, T) segment ids for masked LM with segment embeddings: 0 up to and including a
    row's first separator, 1 after it; 0 throughout a row without one.

    lmforge's token stream has no sentence pairs, only documents each closed by the separator
    (eos). A window that crosses a document's end therefore reads as BERT's `A [SEP] B`: segment
    A ends with the separator, segment B is what follows, the way classify.py builds a pair for
    fine-tuning (`a <eos>` as segment 0, `b <eos>` as 1). There is no next-sentence prediction:
    B is simply the text that came next in the corpus."""
    is_separator = (ids == separator_id).long()
    separators_before = is_separator.cumsum(dim=-1) - is_separator
    return (separators_before > 0).long()


def _span_mask(length: int, n_masked: int, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """A (length,) bool mask of exactly n_masked positions in separate spans of Poisson lengths."""
    mask = torch.zeros(length, dtype=torch.bool)
    if n_masked == 0:
        return mask
    draws = torch.poisson(torch.full((n_masked,), float(mean_span)), generator=generator).long().clamp_(min=1)
    n_spans = int((draws.cumsum(0) < n_masked).sum()) + 1
    spans = draws[:n_spans].clone()
    spans[-1] = n_masked - int(spans[:-1].sum())  # trim the last span to hit n_masked exactly
    n_kept = length - n_masked
    if n_spans > n_kept + 1:  # too many spans to keep them apart: merge the tail into one
        spans = torch.cat([spans[:n_kept], spans[n_kept:].sum(0, keepdim=True)])
        n_spans = len(spans)
    # Split the kept tokens into n_spans+1 gaps, the inner ones >= 1 (stars and bars).
    free = n_kept - (n_spans - 1)
    cuts = torch.randperm(free + n_spans, generator=generator)[:n_spans].sort().values
    bounds = torch.cat([torch.tensor([-1]), cuts, torch.tensor([free + n_spans])])
    gaps = bounds.diff() - 1
    gaps[1:-1] += 1
    starts = gaps[:-1].cumsum(0) + spans.cumsum(0) - spans
    delta = torch.zeros(length + 1, dtype=torch.long)
    delta.index_add_(0, starts, torch.ones_like(starts))
    delta.index_add_(0, starts + spans, -torch.ones_like(starts))
    return delta.cumsum(0)[:length] > 0


def _pad_rows(rows: list[torch.Tensor], fill: int, dtype) -> torch.Tensor:
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def span_corruption(ids: torch.Tensor, sentinel_id: int, prob: float, generator: torch.Generator,
                    mean_span: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption of a (batch, T) tensor: spans chosen as corrupt_spans chooses them
    each become one sentinel in the source, and the target is only what was removed, each span
    after a sentinel (`<s> a b <s> c` for two spans), so the decoder predicts ~prob·T tokens
    instead of rebuilding all T. lmforge's tokenizers have one <mask>, so one sentinel serves every
    span (T5 numbers them); the spans' order tells them apart. Returns (source, target), right-
    padded with -1."""
    length = ids.shape[1]
    n_masked = min(length - 1, max(1, round(prob * length)))
    sources, targets = [], []
    for row in ids:
        mask = _span_mask(length, n_masked, mean_span, generator)
        starts_span = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        sentinel = torch.full_like(row, sentinel_id)
        sources.append(torch.where(mask, sentinel, row)[~mask | starts_span])
        both = torch.stack([sentinel, row], dim=1)  # each position as (sentinel, token)
        keep = torch.stack([starts_span, mask], dim=1)  # a span's first token brings its sentinel
        targets.append(both[keep])
    return _pad_rows(sources, -1, ids.dtype), _pad_rows(targets, -1, ids.dtype)


def corrupt_spans(ids: torch.Tensor, mask_id: int, prob: float, generator: torch.Generator,
                  mean_span: float = 3.0) -> torch.Tensor:
    """BART-style text infilling of a (batch, T) tensor for denoising pretraining.

    In each row, spans with Poisson(mean_span) lengths (at least 1) covering round(prob*T)
    tokens are each replaced by a single mask_id, so the model must also infer how many tokens
    are missing. Rows are right-padded with -1 to a common length (the caller maps -1 to pad).
    """
    batch, length = ids.shape
    n_masked = min(length, max(1, round(prob * length))) if prob > 0 else 0
    rows = []
    for row in ids:
        mask = _span_mask(length, n_masked, mean_span, generator)
        starts_span = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        rows.append(torch.where(mask, torch.full_like(row, mask_id), row)[~mask | starts_span])
    return _pad_rows(rows, -1, ids.dtype)
