"""LayerNorm or RMSNorm, as the config says; both normalise in float32 under bf16 autocast."""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that normalises a bf16 input in float32 under autocast, as autocast already does
    for layer_norm. rms_norm is not on autocast's float32 list, so a bf16 input (the MLM head's
    dense output, say) met the float32 weight: torch warned, skipped its fused kernel and took
    the square mean of 8-bit-mantissa values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        return super().forward(x)


def make_norm(config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
