"""One preallocated KV cache whose rows are the running requests' slots.

All rows share one time axis, as the left-padded batch of `generate` does: a row's tokens
occupy the positions [start, length) and the mask hides everything before `start`. Positions
count real tokens only (model/transformer.py's `default_position_ids`), so a request computes
the same numbers whichever column it starts in. A request joins by copying its own prefill
cache into a free row ending at `length`, and leaves by moving the last row into its place, so
the running rows stay the first `rows` of the buffers and a step runs on views of them.

The time axis is reclaimed when it fills up (`make_room`): every row is shifted to end at the
longest row's length, which keeps each row's tokens contiguous (ALiBi and relative positions
see the same distances as before).
"""

from __future__ import annotations

import torch

from lmforge.model.cache import KVCache, LayerCache


def _view(keys: torch.Tensor, values: torch.Tensor, length: int) -> LayerCache:
    """A LayerCache over existing buffers (LayerCache's constructor would allocate new ones)."""
    layer = LayerCache.__new__(LayerCache)
    layer.keys, layer.values, layer.length, layer.cross = keys, values, length, None
    return layer


class SlotCache:
    def __init__(self, model, capacity: int, max_len: int):
        config = model.config
        n_layers = config.decoder_layers if config.arch == "encoder-decoder" else config.n_layer
        param = next(model.parameters())
        shape = (capacity, config.kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n_layers)]
        self.capacity, self.max_len = capacity, max_len
        self.length = 0  # the shared time axis: positions [0, length) are filled
        self.starts: list[int] = []  # per running row, where its tokens begin

    @property
    def rows(self) -> int:
        return len(self.starts)

    def view(self) -> KVCache:
        """The running rows as a KVCache the model appends one step to (in place, in these buffers)."""
        cache = KVCache.__new__(KVCache)
        cache.max_len = self.max_len
        n = self.rows
        cache.layers = [_view(k[:n], v[:n], self.length) for k, v in zip(self.keys, self.values, strict=True)]
        return cache

    def mask(self) -> torch.Tensor | None:
        """(rows, length + 1) attention mask for the next step; None when no row has padding,
        so the model takes its mask-free path (as `generate` does for a single prompt)."""
        if not any(self.starts):
            return None
        starts = torch.tensor(self.starts)[:, None]
        return (torch.arange(self.length + 1)[None, :] >= starts).long()

    def add(self, prefill: KVCache, source: int = 0) -> int:
        """Copy row `source` of a prefill cache into a new row ending at `length`; return the row."""
        used = prefill.length
        if used > self.length:  # a longer prompt than the time axis so far: move every row right
            self._shift(used - self.length)
        row = self.rows
        begin = self.length - used
        for i, layer in enumerate(prefill.layers):
            self.keys[i][row, :, begin : self.length] = layer.keys[source, :, :used]
            self.values[i][row, :, begin : self.length] = layer.values[source, :, :used]
        self.starts.append(begin)
        return row

    def remove(self, row: int) -> None:
        """Free a row: the last row moves into it (callers remove rows from the highest down)."""
        last = self.rows - 1
        if row != last:
            for k, v in zip(self.keys, self.values, strict=True):
                k[row, :, : self.length] = k[last, :, : self.length]
                v[row, :, : self.length] = v[last, :, : self.length]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.length = 0

    def make_room(self) -> None:
        """Before a step: make sure one more position fits, and drop columns no row uses."""
        if not self.starts:
            return
        if self.length + 1 > self.max_len:
            self._realign()
        elif min(self.starts) > 0 and min(self.starts) >= self.length // 2:
            self._shift(-min(self.starts))

    def _shift(self, by: int) -> None:
        """Move the whole time axis right (by > 0) or left (by < 0)."""
        n, old = self.rows, self.length
        new = old + by
        for buffer in (*self.keys, *self.values):
            if by > 0:
                buffer[:n, :, by:new] = buffer[:n, :, :old].clone()
            else:
                buffer[:n, :, :new] = buffer[:n, :, -by:old].clone()
        self.starts = [s + by for s in self.starts]
        self.length = new

    def _realign(self) -> None:
        """Every row ends at the longest row's length: the shortest time axis holding all rows."""
        lengths = [self.length - s for s in self.starts]
        new = max(lengths)
        for row, (start, used) in enumerate(zip(self.starts, lengths, strict=True)):
            begin = new - used
            if begin != start:
                for buffer in (*self.keys, *self.values):
                    buffer[row, :, begin:new] = buffer[row, :, start : self.length].clone()
            self.starts[row] = begin
        self.length = new
