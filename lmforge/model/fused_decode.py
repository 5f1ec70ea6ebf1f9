"""A decoder block's decoding step in one C++ call (csrc/decode.cpp), when the block allows it.

Eager decoding runs ~30 small operations per block for each new token; their Python and
dispatch overhead, not their arithmetic, cost GPT-2 small about as much time per token as its
int8 matrix products. `Block.forward` hands a step here when `fits` says the kernel computes
exactly what the modules would (`fits`, then `plan`): pre-norm or post-norm, self-attention and
(encoder-decoder) cross-attention once the encoder's keys and values are cached, no score bias
(ALiBi, relative), LayerNorm or RMSNorm, one of the usual activations, fp32 or int8 weights, a
few rows of one token each, nothing to differentiate, no autocast. Everything else
keeps the module path, which stays the reference the tests compare this one against. Forward
hooks on the block's sub-modules do not run on this path (set `enabled = False` to keep them).
Under torch.compile the operator is opaque (kernels.py registers its output shape; the cache
length is a SymInt, so the growing cache does not recompile it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge import kernels
from lmforge.model.attention import AttentionContext
from lmforge.model.cache import LayerCache
from lmforge.model.linear import Linear
from lmforge.model.norms import RMSNorm
from lmforge.quantize import Int8Linear

NORMS = {nn.LayerNorm: 0, RMSNorm: 1}
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # SwiGLU (3) has no activation module
KERNEL_WEIGHTS = (torch.float32, torch.int8)
enabled = True  # False: every block keeps the module path (tests compare the two)


def _linear_parts(layer: nn.Module) -> list | None:
    """[weight, scales, bias] of a Linear or an Int8Linear with a weight the kernel reads; else None."""
    kind = type(layer)
    if kind is Linear:
        parts = [layer.weight, None, layer.bias]
    elif kind is Int8Linear:
        parts = [layer.weight, layer.scales, layer.bias]
    else:
        return None
    weight = parts[0]
    return parts if weight.dtype in KERNEL_WEIGHTS and weight.is_contiguous() else None


def _activation_code(ffn: nn.Module) -> int | None:
    if ffn.gated:
        return 3
    act = ffn.act
    if type(act) is nn.ReLU:
        return ACTIVATIONS["relu"]
    if isinstance(act, nn.GELU):
        return ACTIVATIONS["gelu_tanh" if act.approximate == "tanh" else "gelu"]
    return None


def plan(block: nn.Module) -> tuple | None:
    """(parameters, dims, numbers) for the kernel, or None if the block has a part it does not
    implement. Made afresh on every step (~15 µs of Python for a block), so whatever changed in
    the block since the last step (quantize_int8 swapping its layers, a loaded or reassigned
    weight, another activation) is what the kernel computes with, and no replaced tensor is
    kept alive. numbers: [norm eps, attention scale(, cross-attention scale)]."""
    attn, ffn, norm1, norm2, cross = block.attn, block.ffn, block.attn_norm, block.ffn_norm, block.cross_attn
    norms = (norm1, norm2) if cross is None else (norm1, block.cross_norm, norm2)
    norm = NORMS.get(type(norm1))
    if norm is None or any(type(n) is not type(norm1) or n.eps != norm1.eps for n in norms):
        return None
    if attn.cross or attn.relative is not None or attn.alibi is not None:
        return None
    if any(n.weight is None or n.weight.dtype != torch.float32 for n in norms):
        return None
    activation = _activation_code(ffn)
    layers = [attn.qkv, attn.proj, ffn.up, ffn.down] + ([] if cross is None else [cross.q, cross.proj])
    parts = [_linear_parts(layer) for layer in layers]
    if activation is None or any(p is None for p in parts):
        return None
    params = [norm1.weight, getattr(norm1, "bias", None), *parts[0], *parts[1], norm2.weight,
              getattr(norm2, "bias", None), *parts[2], *parts[3]]
    eps = norm1.eps if norm1.eps is not None else torch.finfo(torch.float32).eps
    dims = [attn.n_head, attn.n_kv_head, attn.head_dim, norm, activation, int(not block.pre_norm)]
    numbers = [float(eps), attn.scale]
    if cross is not None:
        params += [block.cross_norm.weight, getattr(block.cross_norm, "bias", None), *parts[4], *parts[5]]
        numbers.append(cross.scale)
    return params, dims, numbers


def fits(block: nn.Module, x: torch.Tensor, cache: LayerCache | None) -> bool:
    """Cheap conditions first: most calls (training, prefill) fail on the first two. A block
    with cross-attention waits for the first step to cache the encoder's keys and values."""
    if cache is None or x.shape[1] != 1 or not enabled or block.training:
        return False
    if block.cross_attn is not None and cache.cross is None:
        return False
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):  # the module path would run parts of the step in bf16
        return False
    if x.shape[0] > kernels.MAX_DECODE_ROWS or cache.keys.dtype != torch.float32:
        return False
    return kernels.available()


def run(block: nn.Module, x: torch.Tensor, ctx: AttentionContext, cache: LayerCache,
        memory_ctx: AttentionContext | None = None) -> torch.Tensor | None:
    """The block's output for x (B, 1, C), with this token's key and value appended to `cache`;
    None if the block has a part the kernel does not implement."""
    recipe = plan(block)
    if recipe is None:
        return None
    params, dims, numbers = recipe
    end = cache.room_for(1)
    cos = sin = None
    if block.attn.rotary is not None:
        cos, sin = _rotary_rows(block.attn.rotary, ctx, x.shape[0])
    key_mask = None  # (B or 1, 1, 1, T) → (B, T)
    if ctx.mask is not None:
        key_mask = ctx.mask.expand(x.shape[0], -1, -1, -1).reshape(x.shape[0], -1)
    cross_keys = cross_values = cross_mask = None
    if block.cross_attn is not None:
        cross_keys, cross_values = cache.cross
        if memory_ctx is not None and memory_ctx.mask is not None:  # (S or 1, 1, 1, Ts) → (S, Ts)
            sources = cross_keys.shape[0]
            if memory_ctx.mask.shape[0] not in (1, sources):  # a mask row per beam: the module path's case
                return None
            cross_mask = memory_ctx.mask.expand(sources, -1, -1, -1).reshape(sources, -1)
    out = torch.ops.lmforge.decode_block.default(
        x.view(x.shape[0], -1), params, cache.keys, cache.values, cache.length, key_mask, cos, sin, dims, numbers,
        cross_keys, cross_values, cross_mask
    )
    cache.length = end
    return out.view_as(x)


def _rotary_rows(rotary: nn.Module, ctx: AttentionContext, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) rows (B, head_dim) of each row's position, looked up once per step."""
    if ctx.decode_rotary is None:
        positions = ctx.position_ids[:, -1].expand(batch)
        ctx.decode_rotary = (rotary.cos[positions].contiguous(), rotary.sin[positions].contiguous())
    return ctx.decode_rotary
