"""The fused decoding step (model/fused_decode.py, csrc/decode.cpp) against the module path it
replaces: logits and cache contents for every block layout it accepts, fp32 and int8 weights,
left-padded batches; which blocks it refuses; its plan following a quantised model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.model import LanguageModel, fused_decode
from lmforge.quantize import quantize_int8

BASE = dict(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32, init_std=0.2, tie_embeddings=False)
LAYOUTS = {
    "gpt2": dict(position="learned", activation="gelu", norm="layernorm", bias=True),
    "llama": dict(position="rope", activation="swiglu", norm="rmsnorm", bias=False, n_kv_head=2),
    "default": dict(),
    "gelu_tanh_sinusoidal": dict(activation="gelu_tanh", position="sinusoidal", bias=True),
    "relu_layernorm_no_bias": dict(activation="relu", norm="layernorm", bias=False, n_kv_head=1),
    "scaled_by_layer": dict(position="learned", scale_attn_by_inverse_layer_idx=True),
}


@pytest.fixture
def kernel():
    if not kernels.available():
        pytest.skip("lmforge's CPU kernels cannot be built here")


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    calls = []
    real = fused_decode.run

    def spy(block, x, ctx, cache):
        out = real(block, x, ctx, cache)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused_decode, "run", spy)
    return calls


def build(layout: str, int8: bool = False) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**BASE, **LAYOUTS[layout])).eval()
    return quantize_int8(model) if int8 else model


@torch.no_grad()
def stepwise(model: LanguageModel, fused: bool, steps: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of a left-padded batch of 2 decoded `steps` tokens after its prompt, and the cache."""
    fused_decode.enabled = fused
    try:
        ids = torch.tensor([[5, 9, 2, 7, 3], [0, 0, 0, 4, 8]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
        cache = model.new_cache(2, ids.shape[1] + steps)
        model(ids, attention_mask=mask, cache=cache)
        full = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], dim=1)
        logits = []
        for step in range(steps):
            tokens = torch.tensor([[11 + step], [20 + step]])
            out = model(tokens, attention_mask=full[:, : cache.length + 1], cache=cache, last_only=True)
            logits.append(out.logits[:, -1])
        assert cache.length == ids.shape[1] + steps
        return torch.stack(logits, 1), [t for layer in cache.layers for t in (layer.keys, layer.values)]
    finally:
        fused_decode.enabled = True


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_step_equals_the_module_path(kernel, fused_calls, layout, int8):
    model = build(layout, int8)
    fused_logits, fused_cache = stepwise(model, fused=True)
    assert fused_calls and all(fused_calls)  # every block of every step ran fused
    fused_calls.clear()
    module_logits, module_cache = stepwise(model, fused=False)
    assert not fused_calls
    torch.testing.assert_close(fused_logits, module_logits, rtol=1e-5, atol=1e-5)
    for fused, module in zip(fused_cache, module_cache, strict=True):
        torch.testing.assert_close(fused, module, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_greedy_tokens_are_the_same_fused_or_not(kernel, fused_calls, layout):
    model = build(layout)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    config = GenerationConfig(max_new_tokens=24, temperature=0)
    fused = [tokens for tokens, _ in decode_steps(model, prompts, config)]
    assert fused_calls and all(fused_calls)
    fused_decode.enabled = False
    try:
        plain = [tokens for tokens, _ in decode_steps(model, prompts, config)]
    finally:
        fused_decode.enabled = True
    assert fused == plain


@pytest.mark.parametrize(
    "overrides",
    [dict(position="alibi"), dict(position="relative"), dict(norm_position="post"), dict(arch="encoder-decoder")],
    ids=["alibi", "relative", "post-norm", "cross-attention"],
)
def test_blocks_the_kernel_does_not_implement_keep_the_module_path(kernel, overrides):
    model = LanguageModel(ModelConfig(**BASE, **overrides)).eval()
    assert all(fused_decode.plan(block) is None for block in model.decoder.blocks)


def test_decoding_a_refused_block_still_works(kernel, fused_calls):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**BASE, position="alibi")).eval()
    tokens = [t for t, _ in decode_steps(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5, temperature=0))]
    assert len(tokens) == 5 and fused_calls and not any(fused_calls)


def test_the_plan_follows_quantisation_in_place(kernel):
    model = build("gpt2")
    block = model.decoder.blocks[0]
    assert fused_decode.plan(block)[0][2].dtype == torch.float32  # the qkv weight
    quantize_int8(model)  # swaps the block's Linear layers for Int8Linear ones
    params = fused_decode.plan(block)[0]
    assert params[2].dtype == torch.int8 and params[3] is block.attn.qkv.scales


def test_only_inference_on_a_few_single_token_rows_is_fused(kernel):
    model = build("default")
    block = model.decoder.blocks[0]
    cache = model.new_cache(kernels.MAX_ROWS + 1, 8).layers[0]
    one = torch.randn(2, 1, 32)
    with torch.no_grad():
        assert fused_decode.fits(block, one, cache, None)
        assert not fused_decode.fits(block, torch.randn(2, 3, 32), cache, None)  # a prompt
        assert not fused_decode.fits(block, torch.randn(kernels.MAX_ROWS + 1, 1, 32), cache, None)
        assert not fused_decode.fits(block, one, None, None)
        block.train()
        assert not fused_decode.fits(block, one, cache, None)  # dropout would be skipped
        block.eval()
    assert not fused_decode.fits(block, one, cache, None)  # autograd on: the kernel has no backward


def test_a_full_cache_is_refused_with_the_module_paths_message(kernel):
    model = build("default")
    cache = model.new_cache(1, 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 3 positions; 4 requested"):
            model(torch.tensor([[4]]), cache=cache)


def test_the_operator_checks_weight_shapes(kernel):
    model = build("gpt2")
    params, dims, numbers = fused_decode.plan(model.decoder.blocks[0])
    params = list(params)
    params[5] = params[5][:, :-1].contiguous()  # the output projection, one input column short
    cache = model.new_cache(1, 4).layers[0]
    with pytest.raises(RuntimeError, match="weight shapes do not match"):
        torch.ops.lmforge.decode_block(torch.randn(1, 32), params, cache.keys, cache.values, 0, None, None, None,
                                       dims, numbers)


def test_a_deep_copy_gets_its_own_plan(kernel):
    model = build("gpt2")
    fused_decode.plan(model.decoder.blocks[0])
    twin = copy.deepcopy(model)
    assert fused_decode.plan(twin.decoder.blocks[0])[0][2] is twin.decoder.blocks[0].attn.qkv.weight
