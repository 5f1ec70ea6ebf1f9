"""A decoder block's decoding step in one C++ call (csrc/decode.cpp), when the block allows it.

Eager decoding runs ~30 small operations per block for each new token; their Python and
dispatch overhead, not their arithmetic, cost GPT-2 small about as much time per token as its
int8 matrix products. `Block.forward` hands a step here when `fits` says the kernel computes
exactly what the modules would: pre-norm, self-attention only, no score bias (ALiBi, relative),
LayerNorm or RMSNorm, one of the usual activations, fp32 or int8 weights, a few rows of one
token each, nothing to differentiate. Everything else keeps the module path, which stays the
reference the tests compare this one against. Forward hooks on the block's sub-modules do not
run on this path. Under torch.compile the operator is opaque (kernels.py registers its output
shape; the cache length is a SymInt, so one graph serves every step).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn

from lmforge import kernels
from lmforge.model.attention import AttentionContext
from lmforge.model.cache import LayerCache
from lmforge.model.linear import Linear

NORMS = {nn.LayerNorm: 0, nn.RMSNorm: 1}
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # SwiGLU (3) has no activation module
enabled = True  # tests switch it off to compare with the module path


def _linear_parts(layer: nn.Module) -> list | None:
    """[weight, scales, bias] of a Linear or an Int8Linear; None for any other layer."""
    from lmforge.quantize import Int8Linear  # quantize imports the model's Linear: import here

    if type(layer) is Linear:
        return [layer.weight, None, layer.bias]
    if type(layer) is Int8Linear:
        return [layer.weight, layer.scales, layer.bias]
    return None


def _kernel_weight(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.float32, torch.int8) and weight.is_contiguous()


def _activation_code(ffn: nn.Module) -> int | None:
    if ffn.gated:
        return 3
    act = ffn.act
    if isinstance(act, nn.GELU):
        return ACTIVATIONS["gelu_tanh" if act.approximate == "tanh" else "gelu"]
    return ACTIVATIONS["relu"] if type(act) is nn.ReLU else None


def plan(block: nn.Module) -> tuple | None:
    """(parameters, dims, [norm eps, attention scale]) for the kernel, or None if the block has
    a part it does not implement. Kept on the block with the sub-modules and weights it was made
    from, and remade when one of them changes (quantize_int8 swaps the layers, for one): making
    it costs ~35 µs of Python, checking it ~5."""
    attn, ffn = block.attn, block.ffn
    layers = (attn.qkv, attn.proj, ffn.up, ffn.down)
    key = (*layers, *(layer.weight for layer in layers), block.attn_norm, block.ffn_norm, block.cross_attn)
    saved = block.__dict__.get("_fused_plan")
    if saved is None or not all(map(operator.is_, saved[0], key)):
        saved = block.__dict__["_fused_plan"] = (key, _make_plan(block))
    return saved[1]


def _make_plan(block: nn.Module) -> tuple | None:
    attn, ffn = block.attn, block.ffn
    norms = (block.attn_norm, block.ffn_norm)
    if not block.pre_norm or block.cross_attn is not None or attn.cross or attn.relative is not None:
        return None
    if attn.alibi is not None or any(type(n) not in NORMS or n.weight is None for n in norms):
        return None
    if type(norms[0]) is not type(norms[1]) or norms[0].eps != norms[1].eps:
        return None
    activation = _activation_code(ffn)
    layers = [_linear_parts(layer) for layer in (attn.qkv, attn.proj, ffn.up, ffn.down)]
    if activation is None or any(parts is None or not _kernel_weight(parts[0]) for parts in layers):
        return None
    if any(n.weight.dtype != torch.float32 for n in norms):
        return None
    norm1, norm2 = ([n.weight, getattr(n, "bias", None)] for n in norms)
    params = [*norm1, *layers[0], *layers[1], *norm2, *layers[2], *layers[3]]
    eps = norms[0].eps if norms[0].eps is not None else torch.finfo(torch.float32).eps
    dims = [attn.n_head, attn.n_kv_head, attn.head_dim, NORMS[type(norms[0])], activation]
    return params, dims, [float(eps), attn.scale]


def fits(block: nn.Module, x: torch.Tensor, cache: LayerCache | None, memory) -> bool:
    """Cheap conditions first: most calls (training, prefill) fail on the first two."""
    if cache is None or x.shape[1] != 1 or not enabled or memory is not None or block.training:
        return False
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if x.shape[0] > kernels.MAX_ROWS or cache.keys.dtype != torch.float32:
        return False
    return kernels.available()


def run(block: nn.Module, x: torch.Tensor, ctx: AttentionContext, cache: LayerCache) -> torch.Tensor | None:
    """The block's output for x (B, 1, C), with this token's key and value appended to `cache`;
    None if the block has a part the kernel does not implement."""
    recipe = plan(block)
    if recipe is None:
        return None
    params, dims, numbers = recipe
    if cache.length + 1 > cache.keys.shape[2]:
        raise ValueError(f"KV cache holds {cache.keys.shape[2]} positions; {cache.length + 1} requested")
    cos = sin = None
    if block.attn.rotary is not None:
        cos, sin = _rotary_rows(block.attn.rotary, ctx, x.shape[0])
    key_mask = None if ctx.mask is None else ctx.mask.reshape(x.shape[0], -1)
    out = torch.ops.lmforge.decode_block.default(
        x.view(x.shape[0], -1), params, cache.keys, cache.values, cache.length, key_mask, cos, sin, dims, numbers
    )
    cache.length += 1
    return out.view_as(x)


def _rotary_rows(rotary: nn.Module, ctx: AttentionContext, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) rows (B, head_dim) of each row's position, looked up once per step."""
    if ctx.decode_rotary is None:
        positions = ctx.position_ids[:, -1].expand(batch)
        ctx.decode_rotary = (rotary.cos[positions].contiguous(), rotary.sin[positions].contiguous())
    return ctx.decode_rotary
