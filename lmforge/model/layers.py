"""Norms, the feed-forward network and the Transformer block that joins them with attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.model import fused_decode
from lmforge.model.attention import Attention, AttentionContext
from lmforge.model.cache import LayerCache
from lmforge.model.linear import Linear
from lmforge.model.norms import make_norm
from lmforge.model.position import Rotary


class GELU(nn.GELU):
    """Exact GELU; in float32 on the CPU it runs lmforge's kernel, whose forward pass also stores
    the derivative (the backward pass is then one multiply: ~2.5× less time than torch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmforge.gelu(x) if kernels.usable_for(x) else super().forward(x)


ACTIVATIONS = {  # factories: every layer gets its own module, so hooks stay per layer
    "gelu": GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class FeedForward(nn.Module):
    """Position-wise MLP; SwiGLU computes its gate and value in one projection, then splits."""

    def __init__(self, config):
        super().__init__()
        width = config.ffn_width
        self.gated = config.activation == "swiglu"
        self.up = Linear(config.n_embd, 2 * width if self.gated else width, bias=config.bias)
        self.down = Linear(width, config.n_embd, bias=config.bias)
        self.act = None if self.gated else ACTIVATIONS[config.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = self.act(h)
        return self.down(h)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual sub-layer.

    Pre-norm (GPT-2, Llama) normalises each sub-layer's input; post-norm (original Transformer,
    BERT) normalises after the residual sum."""

    def __init__(self, config, layer_idx: int, causal: bool, cross: bool, rotary: Rotary | None):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx, causal, rotary=rotary)
        if cross:
            self.cross_norm = make_norm(config)
            self.cross_attn = Attention(config, layer_idx, causal=False, cross=True)
        else:
            self.cross_norm = self.cross_attn = None
        self.ffn_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        cache: LayerCache | None = None,
        memory: torch.Tensor | None = None,
        memory_ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        if fused_decode.fits(self, x, cache):  # one new token: the whole block in one C++ call
            out = fused_decode.run(self, x, ctx, cache, memory_ctx)
            if out is not None:
                return out
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, ctx, cache))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, memory_ctx, cache, memory))
        return self._residual(x, self.ffn_norm, self.ffn)
