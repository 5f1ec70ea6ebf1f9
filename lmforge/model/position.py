"""Position schemes: absolute (sinusoidal, learned), rotary, ALiBi and Shaw-style relative.

Absolute schemes are added to the token embeddings once; the other three act inside attention,
so each exposes what attention needs and nothing more.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sinusoidal_table(n_positions: int, dim: int, halves: bool = False) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); with
    `halves` the same sines fill the first half of the vector and the cosines the second (Marian)."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    sines, cosines = (slice(0, dim // 2), slice(dim // 2, dim)) if halves else (slice(0, dim, 2), slice(1, dim, 2))
    table[:, sines] = torch.sin(position * inv_freq)
    table[:, cosines] = torch.cos(position * inv_freq)
    return table.float()


class SinusoidalPositions(nn.Module):
    """A fixed table (not a parameter, not saved): positions beyond training still have a vector."""

    def __init__(self, n_positions: int, dim: int, halves: bool = False):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, dim, halves), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class Rotary(nn.Module):
    """RoPE: rotates feature pairs of queries and keys by an angle proportional to position, so
    q·k depends only on the distance between the two positions.

    Pairs are (i, i + d/2), the "rotate half" layout of GPT-NeoX and Llama. With the sine's first
    half negated, the whole rotation is x·cos + roll(x, d/2)·sin: three operations, which
    attention applies to queries and keys together (they sit side by side in its projection),
    with tables looked up once per forward pass."""

    def __init__(self, head_dim: int, n_positions: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1).float(), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1).float(), persistent=False)

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype, heads: int = 1) -> tuple[torch.Tensor, ...]:
        """(cos, signed sin) for position_ids (batch or 1, time), shaped (batch or 1, time, heads,
        head_dim) for a (batch, time, heads, head_dim) tensor. Repeated over the heads rather
        than broadcast: elementwise kernels run faster on one long contiguous run than on many
        short ones."""
        return tuple(
            table[position_ids].unsqueeze(2).to(dtype).expand(-1, -1, heads, -1).contiguous()
            for table in (self.cos, self.sin)
        )

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, time, head_dim); position_ids: (batch or 1, time)."""
        cos, sin = self.tables(position_ids, x.dtype)
        return self.rotate(x, cos.transpose(1, 2), sin.transpose(1, 2))


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al.: a geometric sequence starting at 2^(-8/n); for non-powers of two, interleave
    the slopes of the next power of two as the paper does."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest < n_head:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, k_len: int, causal: bool) -> torch.Tensor:
    """Additive score bias -slope * distance, shape (heads, q_len, k_len).

    A causal model only ever looks back, so distance is i - j; a bidirectional one uses |i - j|."""
    k_positions = torch.arange(k_len, device=q_positions.device)
    distance = (q_positions[:, None] - k_positions[None, :]).float()
    distance = distance.clamp(min=0) if causal else distance.abs()
    return -slopes.to(q_positions.device)[:, None, None] * distance


class RelativePositionScores(nn.Module):
    """Shaw et al. (2018): a learned vector a_{clip(j-i, k)} per clipped distance; the score of
    query i for key j gains q_i · a_{j-i}. Computed as q @ table^T, then gathered by distance,
    so memory stays O(T·(2k+1)) rather than O(T²·d)."""

    def __init__(self, max_distance: int, head_dim: int):
        super().__init__()
        self.max_distance = max_distance
        self.table = nn.Embedding(2 * max_distance + 1, head_dim)

    def forward(self, q: torch.Tensor, q_positions: torch.Tensor, k_len: int) -> torch.Tensor:
        """q: (B, H, Tq, hd) → scores (B, H, Tq, Tk), unscaled."""
        k_positions = torch.arange(k_len, device=q.device)
        distance = (k_positions[None, :] - q_positions[:, None]).clamp(-self.max_distance, self.max_distance)
        per_distance = q @ self.table.weight.t()  # (B, H, Tq, 2k+1)
        index = (distance + self.max_distance).expand(q.shape[0], q.shape[1], -1, -1)
        return per_distance.gather(-1, index)
