"""Int8 weight-only quantisation for fast batch-1 decoding on CPU.

Decoding one token at a time reads every weight once per token and does little arithmetic with
it, so its speed is set by memory bandwidth: storing weights in int8 reads a quarter of the bytes
of fp32. Activations stay in floating point; only the stored weights are rounded.

Each output row i of a weight matrix gets its own scale s_i = max_j |W_ij| / 127 (symmetric, no
zero point), and W_ij is stored as round(W_ij / s_i). Because the scale belongs to the output,
x @ W^T = (x @ Q^T) * s: the matrix product runs on the int8 values and the scale multiplies the
result. Which code does that product depends on the number of rows, by measurement (2-core AVX2,
190 MB of fp32-equivalent weights, one row): lmforge's kernel (kernels.py) 5 ms; torch's
`_weight_int8pack_mm` 25 ms (no fast AVX2 path; seconds at 32 rows); dequantising to fp32 and
calling MKL 48 ms. The kernel converts each weight once per tile of up to 4 rows of x, so
with enough rows dequantising once and calling MKL wins (kernels.MAX_INT8_ROWS sets the switch).

    from lmforge.quantize import quantize_int8
    model = quantize_int8(model)   # every nn.Linear, the LM head included, becomes an Int8Linear

The token embedding stays fp32 even when the head is tied to it: a lookup reads one row per
token, so quantising it saves no bandwidth and would only add error.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → (int8 values, fp32 scale per output row)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


_INT8PACK_WORKS: bool | None = None


def int8pack_available() -> bool:
    """Whether this torch build has a working `_weight_int8pack_mm` for CPU (checked once)."""
    global _INT8PACK_WORKS
    if _INT8PACK_WORKS is None:
        try:
            x = torch.ones(1, 8)
            out = torch._weight_int8pack_mm(x, torch.ones(4, 8, dtype=torch.int8), torch.full((4,), 0.5))
            _INT8PACK_WORKS = bool(torch.allclose(out, torch.full((1, 4), 4.0)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT8PACK_WORKS = False
    return _INT8PACK_WORKS


class Int8Linear(nn.Module):
    """A drop-in nn.Linear (same forward signature and result, up to rounding) with int8 weights.

    `weight` (out, in) int8 and `scales` (out,) are buffers, not parameters: nothing trains them.
    The bias, if any, stays in floating point (it is tiny and adds straight to the output)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.use_int8pack = self.weight.device.type == "cpu" and int8pack_available()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_rows(linear.weight)
        return cls(q, scales, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer actually multiplies by (for checks and error estimates)."""
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fits(x, self.weight):  # decoding: a few rows, multiplied by the int8 values directly
            return kernels.small_matmul(x, self.weight, self.scales, self.bias)
        x2 = x.reshape(-1, self.in_features)
        if self.use_int8pack and x2.shape[0] == 1 and x2.dtype == torch.float32:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        else:  # dequantise on the fly: int8 → x's dtype, scale the output columns afterwards
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear and return the model.

    A head tied to the token embedding gets a quantised copy of the shared matrix, so the
    embedding lookup keeps reading fp32 rows. Meant for inference: the model is put in eval mode."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    return model.eval()

