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


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator,
                special_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a (batch, T) tensor: returns (inputs, labels).

    About `prob` of the non-special positions of each row (at least one) are chosen; of those
    80% become mask_id, 10% a random non-special token and 10% stay unchanged, so the model
    cannot learn that only [MASK] positions matter. labels hold the original id at chosen
    positions and -100 elsewhere.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype)
    eligible = ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & eligible
    empty = ~chosen.any(dim=-1) & eligible.any(dim=-1)
    if empty.any():  # force one pick in rows the dice left empty: every row then has a loss
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~eligible, -1.0)
        forced = torch.zeros_like(chosen).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)
        chosen |= forced & empty.unsqueeze(-1)
    action = torch.rand(ids.shape, generator=generator)
    vocab = torch.arange(vocab_size, dtype=ids.dtype)
    allowed = vocab[~torch.isin(vocab, special)]
    random_ids = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


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
    width = max((len(r) for r in rows), default=0)
    out = torch.full((batch, width), -1, dtype=ids.dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
