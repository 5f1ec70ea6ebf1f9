"""The fused decoding step (model/fused_decode.py, csrc/decode.cpp) against the module path it
replaces: logits and cache contents for every block layout it accepts (decoder and
encoder-decoder, pre- and post-norm), fp32 and int8 weights, left-padded batches, beams sharing
their source's encoder keys; which blocks it refuses; its plan following a quantised model."""

from __future__ import annotations

from contextlib import contextmanager

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
    "post_norm": dict(position="learned", norm_position="post", bias=True),
}


@pytest.fixture
def kernel():
    if not kernels.available():
        pytest.skip("lmforge's CPU kernels cannot be built here")


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    calls = []
    real = fused_decode.run

    def spy(block, x, ctx, cache, memory_ctx=None):
        out = real(block, x, ctx, cache, memory_ctx)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused_decode, "run", spy)
    return calls


def build(layout: str, int8: bool = False) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**BASE, **LAYOUTS[layout])).eval()
    return quantize_int8(model) if int8 else model


@contextmanager
def decoding_path(fused: bool):
    """Decode on the fused path or on the module path, then back to the default."""
    fused_decode.enabled = fused
    try:
        yield
    finally:
        fused_decode.enabled = True


PADDED_IDS = torch.tensor([[5, 9, 2, 7, 3], [0, 0, 0, 4, 8]])
PADDED_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])


@torch.no_grad()
def stepwise(model: LanguageModel, fused: bool, steps: int = 4, ids: torch.Tensor = PADDED_IDS,
             mask: torch.Tensor = PADDED_MASK) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of `steps` tokens decoded after the prompt `ids` (a left-padded batch of 2 unless
    given; `mask` may have one row for the whole batch), and the cache."""
    with decoding_path(fused):
        batch = ids.shape[0]
        cache = model.new_cache(batch, ids.shape[1] + steps)
        model(ids, attention_mask=mask, cache=cache)
        full = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=torch.long)], dim=1)
        logits = []
        for step in range(steps):
            tokens = ((11 + step + 9 * torch.arange(batch)) % model.config.vocab_size)[:, None]
            out = model(tokens, attention_mask=full[:, : cache.length + 1], cache=cache, last_only=True)
            logits.append(out.logits[:, -1])
        assert cache.length == ids.shape[1] + steps
        return torch.stack(logits, 1), [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_step_equals_the_module_path(kernel, fused_calls, layout, int8):
    model = build(layout, int8)
    fused_logits, fused_cache = stepwise(model, fused=True)
    assert fused_calls and all(fused_calls)  # every block of every step ran fused
    assert_same_as_module_path(fused_calls, fused_logits, fused_cache, lambda: stepwise(model, fused=False))


def assert_same_as_module_path(fused_calls: list, fused_logits, fused_cache, module_path) -> None:
    """The module path's logits and cache (from `module_path()`, which must not run fused) equal
    the fused ones."""
    fused_calls.clear()
    module_logits, module_cache = module_path()
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
    with decoding_path(fused=False):
        plain = [tokens for tokens, _ in decode_steps(model, prompts, config)]
    assert fused == plain


@pytest.mark.parametrize(
    "overrides",
    [dict(position="alibi"), dict(position="relative"), dict(arch="encoder-decoder", position="relative")],
    ids=["alibi", "relative", "cross-attention-relative"],
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
    cache = model.new_cache(kernels.MAX_DECODE_ROWS + 1, 8).layers[0]
    one = torch.randn(2, 1, 32)
    with torch.no_grad():
        assert fused_decode.fits(block, one, cache)
        assert not fused_decode.fits(block, torch.randn(2, 3, 32), cache)  # a prompt
        assert not fused_decode.fits(block, torch.randn(kernels.MAX_DECODE_ROWS + 1, 1, 32), cache)
        assert not fused_decode.fits(block, one, None)
        block.train()
        assert not fused_decode.fits(block, one, cache)  # dropout would be skipped
        block.eval()
    assert not fused_decode.fits(block, one, cache)  # autograd on: the kernel has no backward


def test_the_fused_step_takes_more_rows_than_plain_products_on_avx2_only():
    """128 rows was measured on AVX2; where MKL has AVX-512 the step keeps the products' limit."""
    assert kernels.decode_row_limit("AVX2") == 128 > kernels.MAX_ROWS
    assert kernels.decode_row_limit("AVX512") == kernels.MAX_ROWS
    assert kernels.decode_row_limit("DEFAULT") == kernels.MAX_ROWS


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


def test_changes_to_a_block_after_decoding_began_are_used(kernel):
    """The plan is remade every step: reassigned weights, another activation or eps count."""
    changes = [
        lambda b: setattr(b.attn_norm, "weight", torch.nn.Parameter(torch.full((32,), 3.0))),
        lambda b: setattr(b.ffn.down, "bias", torch.nn.Parameter(torch.randn(32))),
        lambda b: setattr(b.ffn, "act", torch.nn.ReLU()),
        lambda b: (setattr(b.attn_norm, "eps", 10.0), setattr(b.ffn_norm, "eps", 10.0)),
        lambda b: setattr(b.attn, "scale", 2.0),
    ]
    for change in changes:
        model = build("gpt2")
        stepwise(model, fused=True, steps=1)  # decoding has begun
        change(model.decoder.blocks[0])
        fused, _ = stepwise(model, fused=True)
        module, _ = stepwise(model, fused=False)
        torch.testing.assert_close(fused, module, rtol=1e-5, atol=1e-5)


def test_quantising_after_decoding_keeps_no_fp32_weight_alive(kernel):
    import weakref

    model = build("gpt2")
    stepwise(model, fused=True, steps=1)
    old = weakref.ref(model.decoder.blocks[0].attn.qkv.weight)
    quantize_int8(model)
    assert old() is None


def test_a_mask_with_one_row_for_the_whole_batch(kernel, fused_calls):
    """AttentionContext.mask need only broadcast to the batch."""
    model = build("default")
    ids, mask = torch.tensor([[0, 1, 2], [0, 3, 4]]), torch.tensor([[0, 1, 1]])
    fused, _ = stepwise(model, fused=True, steps=1, ids=ids, mask=mask)
    assert fused_calls and all(fused_calls)
    module, _ = stepwise(model, fused=False, steps=1, ids=ids, mask=mask)
    torch.testing.assert_close(fused, module, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_wider_heads_and_a_full_batch(kernel, fused_calls, int8):
    """head_dim 12 and widths that are not multiples of 32 exercise the kernels' tail loops."""
    torch.manual_seed(1)
    model = LanguageModel(ModelConfig(**{**BASE, "n_embd": 36, "n_head": 3}, position="rope")).eval()
    model = quantize_int8(model) if int8 else model
    prompts = [[i % 60 + 1] * (i % 3 + 1) for i in range(kernels.MAX_DECODE_ROWS)]  # left padding of 0–2
    ids = torch.tensor([[0] * (3 - len(p)) + p for p in prompts])
    mask = (torch.arange(3) >= 3 - torch.tensor([len(p) for p in prompts])[:, None]).long()
    fused, _ = stepwise(model, fused=True, ids=ids, mask=mask)
    assert fused_calls and all(fused_calls)
    module, _ = stepwise(model, fused=False, ids=ids, mask=mask)
    torch.testing.assert_close(fused, module, rtol=1e-5, atol=1e-5)
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    assert len(list(decode_steps(model, prompts, config))) == 6


@pytest.mark.parametrize("head_dim", [32, 64, 128, 24])
def test_each_head_width_of_the_attention_kernel(kernel, fused_calls, head_dim):
    """32, 64 and 128 wide heads keep their outputs in registers (decode.cpp `attend_head`);
    other widths take the general loop. Padded rows check that masked keys get no weight."""
    torch.manual_seed(2)
    width = dict(n_embd=2 * head_dim, n_head=2, init_std=0.05)  # BASE's 0.2 grows wide activations past 1e-6 rounding
    model = LanguageModel(ModelConfig(**{**BASE, **width}, position="rope")).eval()
    fused_logits, fused_cache = stepwise(model, fused=True)
    assert fused_calls and all(fused_calls)
    assert_same_as_module_path(fused_calls, fused_logits, fused_cache, lambda: stepwise(model, fused=False))


def test_the_operator_checks_its_other_inputs(kernel):
    model = build("llama")
    params, dims, numbers = fused_decode.plan(model.decoder.blocks[0])
    cache = model.new_cache(1, 4).layers[0]
    x, table = torch.randn(1, 32), torch.ones(1, 8)
    op = torch.ops.lmforge.decode_block

    def call(**changes):
        args = dict(params=list(params), values=cache.values, cos=table, sin=table, dims=dims, length=0, mask=None)
        args.update(changes)
        op(x, args["params"], cache.keys, args["values"], args["length"], args["mask"], args["cos"], args["sin"],
           args["dims"], numbers)

    call()  # as given: fine
    with pytest.raises(RuntimeError, match="same shape"):
        call(values=cache.values[:, :, :2].contiguous())
    with pytest.raises(RuntimeError, match="both rotary tables or neither"):
        call(sin=None)
    with pytest.raises(RuntimeError, match=r"rotary tables must be contiguous float32 \(B, head_dim\)"):
        call(cos=torch.ones(1, 4), sin=torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="cache shape does not match"):
        call(length=-1)
    cache.keys.zero_()
    with pytest.raises(RuntimeError, match=r"key_mask must be \(B, length \+ 1\)"):
        call(mask=torch.ones(1, 3, dtype=torch.bool))
    assert not cache.keys.any()  # refused before anything was written
    with pytest.raises(RuntimeError, match="unknown activation code"):
        call(dims=[*dims[:4], 9])
    short_norm = list(params)
    short_norm[0] = short_norm[0][:-1]
    with pytest.raises(RuntimeError, match="norm weights, biases and scales"):
        call(params=short_norm)
    no_weight = list(params)
    no_weight[2] = None
    with pytest.raises(RuntimeError, match="a weight is missing"):
        call(params=no_weight)


# ---------------------------------------------------------------- encoder-decoder blocks

SEQ2SEQ_LAYOUTS = {
    "bart": dict(position="learned", norm_position="post", bias=True, embedding_norm=True, lm_head_bias=True),
    "pre_norm": dict(position="sinusoidal", bias=True),
    "t5ish": dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2),
}
SOURCES = [[5, 9, 2, 7, 3, 8], [4, 8, 1], [6, 6, 2, 1]]  # padded to 6: the encoder mask matters


def build_seq2seq(layout: str, int8: bool = False) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(**{**BASE, "n_layer": 1}, arch="encoder-decoder", n_decoder_layer=2, eos_token_id=1,
                         pad_token_id=0, decoder_start_token_id=2, **SEQ2SEQ_LAYOUTS[layout])
    model = LanguageModel(config).eval()
    return quantize_int8(model) if int8 else model


@torch.no_grad()
def seq2seq_steps(model: LanguageModel, fused: bool, beams: int = 1, steps: int = 4):
    """Logits of `steps` decoder tokens after the encoder, each source's rows repeated `beams`
    times (the encoder's keys shared by them, as beam search shares them), and the caches."""
    from lmforge.generate import _right_pad

    with decoding_path(fused):
        ids, mask = _right_pad(SOURCES, 0)
        memory = model.encode(ids, mask)
        rows = len(SOURCES) * beams
        cache = model.new_cache(rows, steps)
        logits = []
        for step in range(steps):
            tokens = ((11 + step + 7 * torch.arange(rows)) % model.config.vocab_size)[:, None]
            out = model(None, mask, decoder_input_ids=tokens, cache=cache, encoder_output=memory, last_only=True)
            logits.append(out.logits[:, -1])
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values, *layer.cross)]
        return torch.stack(logits, 1), tensors


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("layout", sorted(SEQ2SEQ_LAYOUTS))
def test_fused_encoder_decoder_step_equals_the_module_path(kernel, fused_calls, layout, int8, beams):
    model = build_seq2seq(layout, int8)
    fused_logits, fused_cache = seq2seq_steps(model, fused=True, beams=beams)
    # the first step caches the encoder's keys on the module path; every later block runs fused
    assert fused_calls == [True] * 6
    assert_same_as_module_path(fused_calls, fused_logits, fused_cache,
                               lambda: seq2seq_steps(model, fused=False, beams=beams))


@pytest.mark.parametrize("layout", ["bart", "pre_norm"])
def test_beam_search_finds_the_same_hypotheses_fused_or_not(kernel, fused_calls, layout):
    from lmforge.beam import BeamConfig, beam_search

    model = build_seq2seq(layout)
    config = BeamConfig(num_beams=3, num_return_sequences=2, max_length=12)
    fused = beam_search(model, SOURCES, config, eos_token_id=1, pad_token_id=0)
    assert any(fused_calls)
    with decoding_path(fused=False):
        plain = beam_search(model, SOURCES, config, eos_token_id=1, pad_token_id=0)
    assert [[h.tokens for h in hyps] for hyps in fused] == [[h.tokens for h in hyps] for hyps in plain]
    for mine, theirs in zip(fused, plain, strict=True):
        assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], abs=1e-4)


def test_the_operator_checks_the_encoder_inputs(kernel):
    model = build_seq2seq("bart")
    _, cache_tensors = seq2seq_steps(model, fused=False, steps=1)
    block = model.decoder.blocks[0]
    params, dims, numbers = fused_decode.plan(block)
    cache = model.new_cache(3, 4).layers[0]
    keys, values = cache_tensors[2], cache_tensors[3]  # the first layer's encoder keys (3, 4, 6, 8)
    op = torch.ops.lmforge.decode_block
    x = torch.randn(3, 32)

    def call(p=params, n=numbers, k=keys, v=values, mask=None):
        return op(x, p, cache.keys, cache.values, 0, None, None, None, dims, n, k, v, mask)

    call()  # as given: fine
    call(mask=torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="needs the encoder's keys, values and their scale"):
        call(k=None)
    with pytest.raises(RuntimeError, match="wrong argument count"):
        call(n=numbers[:2])
    with pytest.raises(RuntimeError, match=r"cross_mask must be \(S, encoder length\)"):
        call(mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="must be contiguous float32"):
        call(k=keys.transpose(1, 2))
    with pytest.raises(RuntimeError, match="not S sources' beams"):
        call(k=keys[:2].contiguous(), v=values[:2].contiguous())
    short = list(params)
    short[kernels_slot("cross_q")] = short[kernels_slot("cross_q")][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match="cross-attention weight shapes do not match"):
        call(p=short)
    plain = fused_decode.plan(build("gpt2").decoder.blocks[0])
    with pytest.raises(RuntimeError, match="encoder keys given to a block without cross-attention"):
        op(x, plain[0], cache.keys, cache.values, 0, None, None, None, plain[1], plain[2], keys, values, None)


def kernels_slot(name: str) -> int:
    """Positions in plan()'s list (csrc/decode.cpp's Slot): 16 for the block, then the cross part."""
    return {"cross_q": 18}[name]
