"""Decoding a seq2seq model folder: texts in, translations or summaries out, in input order.

Greedy decoding is here, written against the small protocol both seq2seq families share
(`encode`, `new_cache`, and a forward that takes one decoder token with a cache and the
encoder's output), so the Transformer and the LSTM decode through the same loop; beam search
is lmforge/beam.py's, with the same length limits (a * source length + b, capped by
--max-length). Texts are decoded in windows sorted by length (little padding) and yielded back
in their own order, so output can stream while later windows still decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from lmforge.errors import LmforgeError
from lmforge.seq2seq.data import Sides

WINDOW_BATCHES = 8  # batches sorted together by length before their results are released


@dataclass
class DecodeOptions:
    beam: int = 1
    n_best: int = 1
    batch_size: int = 32
    max_len_a: float = 1.5  # a target may be at most a * source length + b tokens
    max_len_b: int = 10
    max_len: int | None = None  # an absolute cap (summaries); None: the model's block size
    min_len: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def check(self) -> None:
        for name in ("beam", "n_best", "batch_size"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.n_best > self.beam:
            raise LmforgeError(f"--n-best {self.n_best} needs --beam of at least {self.n_best}")


def start_token(config) -> int:
    for candidate in (config.decoder_start_token_id, config.bos_token_id, config.eos_token_id):
        if candidate is not None:
            return candidate
    raise LmforgeError("seq2seq decoding needs decoder_start_token_id, bos or eos in config.json")


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy(model, sources: list[list[int]], max_lens: list[int], eos_id: int, pad_id: int,
           min_len: int = 0) -> list[tuple[list[int], float]]:
    """The most likely token at every step, for a batch of sources; (ids without eos, the sum
    of their log-probabilities) per source. The encoder runs once; each step feeds one token."""
    model.eval()
    device = next(model.parameters()).device
    src, mask = _right_pad(sources, pad_id, device)
    memory = model.encode(src, mask)
    batch, limit = len(sources), max(max_lens)
    cache = model.new_cache(batch, limit + 1)
    tokens = torch.full((batch,), start_token(model.config), dtype=torch.long, device=device)
    lengths = torch.tensor(max_lens, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    steps = []
    for step in range(limit):
        logits = model(None, mask, decoder_input_ids=tokens[:, None], cache=cache, encoder_output=memory,
                       last_only=True).logits[:, -1].float()
        logprobs = logits.log_softmax(-1)
        if step < min_len:
            logprobs[:, eos_id] = float("-inf")
        best = logprobs.max(-1)
        tokens = torch.where(step + 1 >= lengths, torch.full_like(best.indices, eos_id), best.indices)
        scores += torch.where(done, 0.0, best.values.double())
        steps.append(tokens.masked_fill(done, eos_id))
        done |= tokens == eos_id
        if bool(done.all()):
            break
    rows = torch.stack(steps, 1).tolist()
    outputs = [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
    return [(ids, float(score)) for ids, score in zip(outputs, scores.tolist(), strict=True)]


def _max_lens(sources: list[list[int]], options: DecodeOptions, block_size: int) -> list[int]:
    cap = min(options.max_len or block_size, block_size - 1)
    return [max(1, min(cap, int(options.max_len_a * len(s) + options.max_len_b))) for s in sources]


def decode_batch(model, sides: Sides, sources: list[list[int]],
                 options: DecodeOptions) -> list[list[tuple[str, float]]]:
    """The n best (text, score) of each source, best first."""
    max_lens = _max_lens(sources, options, model.config.block_size)
    if options.beam == 1:
        found = greedy(model, sources, max_lens, sides.eos_id, sides.pad_id, options.min_len)
        return [[(sides.decode(ids), score)] for ids, score in found]
    return _beam_batch(model, sides, sources, max_lens, options)


def _beam_batch(model, sides: Sides, sources, max_lens, options: DecodeOptions):
    from lmforge.beam import BeamConfig, beam_search

    config = BeamConfig(num_beams=options.beam, num_return_sequences=options.n_best,
                        length_penalty=options.length_penalty, early_stopping=True,
                        no_repeat_ngram_size=options.no_repeat_ngram_size, min_length=options.min_len,
                        max_length=max(max_lens) + 1, max_length_ratio=options.max_len_a,
                        max_length_offset=options.max_len_b)  # max_length counts the decoder's start token
    found = beam_search(model, sources, config, eos_token_id=sides.eos_id, pad_token_id=sides.pad_id)
    return [[(sides.decode(h.tokens), float(h.score)) for h in hyps] for hyps in found]


def decode_texts(model, sides: Sides, texts: list[str], options: DecodeOptions,
                 task: dict | None = None) -> Iterator[list[tuple[str, float]]]:
    """Each text's n best (text, score), yielded in input order as soon as its window is done.
    A trained folder's task.json bounds the sources and, unless options say otherwise, the
    outputs by the lengths it trained on."""
    options.check()
    if not texts:
        return
    task = task or {}
    if options.max_len is None and task.get("max_target_len"):
        options = replace(options, max_len=task["max_target_len"])
    limit = min(task.get("max_source_len") or model.config.block_size, model.config.block_size)
    window = options.batch_size * WINDOW_BATCHES
    for start in range(0, len(texts), window):
        chunk = texts[start:start + window]
        if not all(text.strip() for text in chunk):
            empty = start + next(i for i, text in enumerate(chunk) if not text.strip()) + 1
            raise LmforgeError(f"input {empty} is empty: there is nothing to translate or summarise")
        sources = sides.encode_sources([t.strip() for t in chunk], limit)
        order = sorted(range(len(chunk)), key=lambda i: len(sources[i]))
        results: list = [None] * len(chunk)
        for k in range(0, len(order), options.batch_size):
            rows = order[k:k + options.batch_size]
            for row, result in zip(rows, decode_batch(model, sides, [sources[i] for i in rows], options), strict=True):
                results[row] = result
        yield from results
