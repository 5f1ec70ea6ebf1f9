"""Multi-head attention: self or cross, MHA or grouped-query, with every position scheme.

One function builds the boolean mask (causal, padding) once per forward; each layer adds only
its own position bias. Plain causal self-attention in float32 on the CPU goes to lmforge's own
kernel (kernels.py: it reads the heads in place; faster than PyTorch's at 64–512 tokens, as fast at 2048);
everything else ends in `F.scaled_dot_product_attention`, which picks a fused kernel when the
mask allows it (`is_causal=True`, no explicit mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.model.cache import LayerCache
from lmforge.model.linear import Linear
from lmforge.model.position import RelativePositionScores, Rotary, alibi_bias, alibi_slopes


@dataclass
class AttentionContext:
    """What every layer of a stack shares for one forward pass."""

    mask: torch.Tensor | None  # bool, broadcastable to (B, 1, Tq, Tk); True = may attend
    is_causal: bool  # let SDPA apply the causal mask itself (only when mask is None)
    position_ids: torch.Tensor | None = None  # (B or 1, Tq): token positions, for RoPE
    q_index: torch.Tensor | None = None  # (Tq,): index of each query in the key sequence
    rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE cos/sin, looked up by the first layer
    decode_rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # the same for fused decoding (B, head_dim)


def build_mask(
    q_index: torch.Tensor,
    k_len: int,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor | None, bool]:
    """Return (mask, is_causal) for SDPA, preferring no mask at all when SDPA can do without.

    key_padding: (B, Tk) bool, True at real tokens. `explicit` asks for a full mask even when
    is_causal would do, because a score bias (ALiBi, relative) must be combined with it.
    A padding query would see no key at all (a NaN row), so every query may see itself.
    """
    q_len = q_index.shape[0]
    if key_padding is None and not explicit:
        if not causal or q_len == 1:
            return None, False
        if q_len == k_len:
            return None, True
    k_index = torch.arange(k_len, device=q_index.device)
    if causal:
        mask = k_index[None, :] <= q_index[:, None]
    else:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q_index.device)
    if key_padding is not None:
        mask = (mask[None] & key_padding[:, None, :].bool()) | (k_index[None, :] == q_index[:, None])
        return mask[:, None], False
    return mask[None, None], False


class Attention(nn.Module):
    def __init__(
        self, config, layer_idx: int, causal: bool, cross: bool = False, rotary: Rotary | None = None
    ):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.cross = cross
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if cross:
            self.q = Linear(config.n_embd, q_width, bias=config.bias)
            self.kv = Linear(config.n_embd, 2 * kv_width, bias=config.bias)
        else:  # one fused projection: fewer, larger matrix products
            self.qkv = Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
        self.proj = Linear(q_width, config.n_embd, bias=config.bias)
        self.dropout = config.attn_dropout
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.causal = causal and not cross  # only ALiBi needs to know
        self.rotary = None if cross else rotary
        use_position = not cross
        self.relative = (
            RelativePositionScores(config.relative_distance, self.head_dim)
            if use_position and config.position == "relative"
            else None
        )
        if use_position and config.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(self.n_head), persistent=False)
        else:
            self.alibi = None
        self.record: list | None = None  # insight: a list here receives each forward's attention probabilities

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n·hd) → (B, T, n, hd), a view."""
        return x.view(x.shape[0], x.shape[1], n, self.head_dim)

    def rotary_tables(self, ctx: AttentionContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward pass's RoPE tables: looked up by the first layer that needs them, then
        shared through ctx by every other."""
        if ctx.rotary_tables is None:
            ctx.rotary_tables = self.rotary.tables(ctx.position_ids, dtype, self.n_head + self.n_kv_head)
        return ctx.rotary_tables

    def _fused_fits(self, q: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, cache: LayerCache | None) -> bool:
        """Whether lmforge's causal attention kernel applies: plain causal self-attention over
        the whole sequence, no score bias, no dropout, float32 on the CPU (so not under bf16
        autocast, where rotated queries come out float32 and values bf16)."""
        return (self.record is None and cache is None and ctx.is_causal and ctx.mask is None
                and self.relative is None and self.alibi is None
                and (self.dropout == 0.0 or not self.training) and v.dtype == q.dtype and kernels.usable_for(q))

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        cache: LayerCache | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        kv_width = self.n_kv_head * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_head).transpose(1, 2)
            if cache is not None and cache.cross is not None:
                k, v = cache.cross
            else:
                k, v = (self._heads(t, self.n_kv_head).transpose(1, 2) for t in self.kv(memory).split(kv_width, dim=-1))
                if cache is not None:  # laid out (S, heads, T, hd) in memory, as the fused decoding step reads them
                    k, v = k.contiguous(), v.contiguous()
                    cache.cross = (k, v)
            group = B // k.shape[0]
            if group > 1:  # beams of one source share its keys and values: its rows' queries go together
                q = q.reshape(k.shape[0], group, self.n_head, T, self.head_dim).transpose(1, 2).flatten(2, 3)
        else:
            q_width = self.n_head * self.head_dim
            # split, not slices: autograd joins split's gradients with one cat, while each slice
            # would scatter its gradient into a zero-filled copy of the whole projection
            if self.rotary is None:
                q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
                q, k = self._heads(q, self.n_head), self._heads(k, self.n_kv_head)
            else:  # queries and keys rotate together: one pass over both
                qk, v = self.qkv(x).split([q_width + kv_width, kv_width], dim=-1)
                cos, sin = self.rotary_tables(ctx, x.dtype)
                qk = self.rotary.rotate(self._heads(qk, self.n_head + self.n_kv_head), cos, sin)
                q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
            v = self._heads(v, self.n_kv_head)
            if self._fused_fits(q, v, ctx, cache):  # (B, T, heads, hd) in, (B, T, heads, hd) out: no transposes
                y = torch.ops.lmforge.causal_attention(q, k, v, self.scale)
                return self.proj(y.view(B, T, self.n_head * self.head_dim))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.append(k, v)

        mask = ctx.mask
        bias = self._position_bias(q, ctx, k.shape[2])
        if bias is not None:
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        if self.record is not None:
            y = self._recorded(q, k, v, mask, ctx.is_causal and mask is None)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=ctx.is_causal and mask is None,
                scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        if y.shape[0] != B:  # grouped cross-attention queries back to their own rows
            y = y.unflatten(2, (B // y.shape[0], T)).transpose(1, 2).reshape(B, self.n_head, T, self.head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _recorded(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """Attention by an explicit softmax, its probabilities (B, heads, Tq, Tk) appended to
        self.record: what lmforge attention draws. Slower than SDPA, and only used when asked."""
        if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves a group of query heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        scores = (q @ k.transpose(-2, -1)).float() * self.scale
        if causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(dim=-1)
        self.record.append(probs.detach())
        return probs.to(v.dtype) @ v

    def _position_bias(self, q: torch.Tensor, ctx: AttentionContext, k_len: int) -> torch.Tensor | None:
        """Additive score bias from relative positions and/or ALiBi, already scaled."""
        bias = None
        if self.relative is not None:
            bias = self.relative(q, ctx.q_index, k_len) * self.scale
        if self.alibi is not None:
            slope_bias = alibi_bias(self.alibi, ctx.q_index, k_len, self.causal).to(q.dtype)
            bias = slope_bias if bias is None else bias + slope_bias
        return bias
