"""Key/value cache for incremental decoding.

Buffers are allocated once at full length and filled in place, so a decode step copies only the
new token's keys and values instead of concatenating the whole history (which is quadratic).
Cross-attention keys/values depend only on the encoder output, so they are computed once and kept.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Self-attention keys/values of one layer, plus the cross-attention pair if the layer has one."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.cross: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) after what is cached; return views of everything so far."""
        end = self.room_for(k.shape[2])
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def room_for(self, count: int) -> int:
        """The cached length after `count` more positions; an error if they do not fit."""
        end = self.length + count
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; {end} requested")
        return end

    def reorder(self, index: torch.Tensor) -> None:
        """Pick batch rows (beam search keeps the surviving hypotheses)."""
        self.reorder_beams(index, index)

    def reorder_beams(self, index: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        """Pick self-attention rows by `index`; the cross-attention pair by `sources`, or keep it
        when None: beam search keeps one row per source, which Attention shares among its beams.
        Rows that stay as many are moved only as far as they are filled."""
        if index.shape[0] == self.keys.shape[0]:
            filled = slice(0, self.length)
            self.keys[:, :, filled] = self.keys[:, :, filled].index_select(0, index)
            self.values[:, :, filled] = self.values[:, :, filled].index_select(0, index)
        else:  # the batch grows (beams of a prompt) or shrinks (finished sources leave)
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
        if self.cross is not None and sources is not None:
            self.cross = (self.cross[0].index_select(0, sources), self.cross[1].index_select(0, sources))


class KVCache:
    """One LayerCache per decoder layer; `length` is how many positions are already cached."""

    def __init__(self, config, batch: int, max_len: int, dtype=torch.float32, device=None):
        n_layers = config.decoder_layers if config.arch == "encoder-decoder" else config.n_layer
        self.max_len = max_len
        self.layers = [
            LayerCache(batch, config.kv_heads, max_len, config.head_dim, dtype, device) for _ in range(n_layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)

    def reorder_beams(self, index: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        for layer in self.layers:
            layer.reorder_beams(index, sources)
