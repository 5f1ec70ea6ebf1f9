"""The model core: every option builds and trains, causality, padding, KV cache, GPT-2 parity,
parameter/FLOP counts, config validation, dropout and determinism.

Models are tiny (n_embd 32, 2 layers, T <= 12) and initialised with a larger std than the
default so that logits vary enough for the tolerances below to mean something.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONS, ModelConfig
from lmforge.config import TRANSFORMER_ARCHS as ARCHS  # the LSTM baseline has tests of its own (test_lstm.py)
from lmforge.errors import LmforgeError
from lmforge.model import KVCache, LanguageModel, ModelOutput
from lmforge.model.attention import AttentionContext
from lmforge.model.layers import Block

V = 61  # vocabulary size of the small test models
D = 32  # n_embd
P = 32  # block_size


from helpers import one_thread  # noqa: E402,F401  (an autouse fixture: tiny matrices run on one thread)


def make_model(seed: int = 0, **overrides) -> LanguageModel:
    kw = dict(vocab_size=V, block_size=P, n_layer=2, n_head=4, n_embd=D, relative_distance=4, init_std=0.1,
              position="learned")  # the GPT-2 layout unless a test asks otherwise
    kw.update(overrides)
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(**kw)).eval()


def rand_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def different_tokens(ids: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Tokens guaranteed to differ from `ids` at every position."""
    shift = torch.randint(1, V, ids.shape, generator=torch.Generator().manual_seed(seed))
    return (ids + shift) % V


def run(model: LanguageModel, ids: torch.Tensor, tgt: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Logits for any arch: `ids` is the decoder input (decoder), the encoder input (encoder),
    or the source (encoder-decoder, with `tgt` the decoder input)."""
    if model.config.arch == "encoder-decoder":
        return model(ids, decoder_input_ids=tgt, **kw).logits
    return model(ids, **kw).logits


# =========================================================================== 1. builds, forward, backward

VARIATIONS = [
    dict(activation="gelu_tanh"),
    dict(activation="relu"),
    dict(activation="swiglu"),
    dict(norm="rmsnorm"),
    dict(norm_position="post"),
    dict(n_kv_head=2),
    dict(n_kv_head=1),
    dict(dense_connections=True),
    dict(tie_embeddings=False),
    dict(bias=False),
    dict(type_vocab_size=2, embedding_norm=True),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(n_layer=3, norm="rmsnorm", norm_position="post", activation="swiglu", n_kv_head=2, dense_connections=True),
    dict(n_layer=1, n_decoder_layer=3, tie_embeddings=False, bias=False, norm="rmsnorm"),
]


def _cases():
    cases = []
    for arch in ARCHS:
        for position in POSITIONS:
            cases.append(pytest.param(dict(arch=arch, position=position), id=f"{arch}-{position}"))
    for a, arch in enumerate(ARCHS):
        for k, variation in enumerate(VARIATIONS):
            position = POSITIONS[(k + 2 * a) % len(POSITIONS)]  # spread positions over the variations
            kw = dict(arch=arch, position=position, **variation)
            label = "-".join(f"{key}={val}" for key, val in variation.items())
            cases.append(pytest.param(kw, id=f"{arch}-{position}-{label}"))
    return cases


def _manual_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits.double().log_softmax(-1)
    keep = labels != -100
    picked = logp[keep].gather(-1, labels[keep][:, None])
    return -picked.mean()


@pytest.mark.parametrize("kw", _cases())
def test_forward_backward_every_option(kw):
    model = make_model(**kw).train()
    cfg = model.config
    B, T, S = 2, 10, 7
    ids = rand_ids(B, T if cfg.arch != "encoder-decoder" else S)
    labels = rand_ids(B, T, seed=3)
    labels[0, :3] = -100  # ignored positions
    call = dict(labels=labels)
    if cfg.arch == "encoder" and cfg.type_vocab_size:
        call["token_type_ids"] = torch.randint(0, cfg.type_vocab_size, (B, T))
    if cfg.arch == "encoder-decoder":
        call["decoder_input_ids"] = rand_ids(B, T, seed=4)
    out = model(ids, **call)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, T, V)
    assert out.hidden.shape == (B, T, D)
    assert torch.isfinite(out.logits).all()
    assert out.loss is not None and torch.isfinite(out.loss)
    # the loss is mean cross-entropy over the non-ignored, *unshifted* labels
    assert out.loss.item() == pytest.approx(_manual_loss(out.logits, labels).item(), rel=1e-5, abs=1e-5)
    if cfg.arch == "encoder-decoder":
        assert out.encoder_output.shape == (B, S, D)
    out.loss.backward()
    params = dict(model.named_parameters())
    assert params, "model has no parameters"
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("arch", ARCHS)
def test_option_structure(arch):
    """The options change what is built, not just a name in the config."""
    base = make_model(arch=arch)
    names = {n for n, _ in base.named_parameters()}
    stack = base.decoder if arch != "encoder" else base.encoder
    block = stack.blocks[0]
    assert isinstance(block.attn_norm, torch.nn.LayerNorm)
    assert isinstance(stack.final_norm, torch.nn.LayerNorm)
    assert block.ffn.up.out_features == 4 * D
    assert (base.encoder is not None) == (arch != "decoder")
    assert (base.decoder is not None) == (arch != "encoder")
    assert (block.cross_attn is not None) == (arch == "encoder-decoder")
    assert stack.dense is None
    assert not any(".dense." in n for n in names if n.startswith(("encoder.", "decoder.")))

    rms = make_model(arch=arch, norm="rmsnorm", norm_position="post")
    rstack = rms.decoder if arch != "encoder" else rms.encoder
    assert isinstance(rstack.blocks[0].attn_norm, torch.nn.RMSNorm)
    assert isinstance(rstack.final_norm, torch.nn.Identity)  # post-norm: no final norm

    swiglu = make_model(arch=arch, activation="swiglu")
    width = swiglu.config.ffn_width
    sstack = swiglu.decoder if arch != "encoder" else swiglu.encoder
    assert sstack.blocks[0].ffn.up.out_features == 2 * width
    assert sstack.blocks[0].ffn.down.in_features == width

    nobias = make_model(arch=arch, bias=False)
    for name, _p in nobias.named_parameters():
        if name.startswith(("encoder.", "decoder.")):
            assert not name.endswith(".bias"), name

    dense = make_model(arch=arch, dense_connections=True, n_layer=3, n_decoder_layer=3)
    dstack = dense.decoder if arch != "encoder" else dense.encoder
    assert [m.in_features for m in dstack.dense] == [2 * D, 3 * D]


def test_swiglu_feed_forward_is_gated():
    model = make_model(activation="swiglu", bias=True)
    ffn = model.decoder.blocks[0].ffn
    x = torch.randn(2, 3, D)
    gate, value = ffn.up(x).chunk(2, dim=-1)
    expected = ffn.down(gate * torch.sigmoid(gate) * value)
    torch.testing.assert_close(ffn(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "activation,fn",
    [
        ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
        ("gelu_tanh", lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))),
        ("relu", lambda h: h.clamp(min=0)),
    ],
)
def test_feed_forward_activation(activation, fn):
    model = make_model(activation=activation)
    ffn = model.decoder.blocks[0].ffn
    x = torch.randn(2, 3, D) * 3
    torch.testing.assert_close(ffn(x), ffn.down(fn(ffn.up(x))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_block_norm_placement(norm, norm_position):
    """Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)), whose output is normalised."""
    model = make_model(norm=norm, norm_position=norm_position)
    block: Block = model.decoder.blocks[0]
    x = torch.randn(1, 5, D) * 3 + 1
    ctx = AttentionContext(None, True, torch.arange(5)[None], torch.arange(5))
    out = block(x, ctx)
    if norm_position == "pre":
        h = x + block.attn(block.attn_norm(x), ctx)
        expected = h + block.ffn(block.ffn_norm(h))
    else:
        h = block.attn_norm(x + block.attn(x, ctx))
        expected = block.ffn_norm(h + block.ffn(h))
        # fresh norms have unit weight (and zero bias): each token comes out normalised
        rms = out.pow(2).mean(-1).sqrt() if norm == "rmsnorm" else out.std(-1, unbiased=False)
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
        if norm == "layernorm":
            torch.testing.assert_close(out.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_connections_definition(arch):
    """Layer i > 0 reads dense[i-1](concat(embeddings, out_0, ..., out_{i-1})), not the last output."""
    model = make_model(arch=arch, dense_connections=True, n_layer=3, n_decoder_layer=3, position="rope")
    stack = model.encoder if arch == "encoder" else model.decoder
    captured = {}

    def hook(_module, args, _output):
        captured["args"] = args + (None,) * (5 - len(args))  # x, ctx, cache, memory, memory_ctx

    handle = stack.register_forward_hook(hook)
    ids, tgt = rand_ids(2, 7), rand_ids(2, 5, seed=3)
    try:
        out = model(ids, decoder_input_ids=tgt) if arch == "encoder-decoder" else model(ids)
    finally:
        handle.remove()
    x, ctx, cache, memory, memory_ctx = captured["args"]
    outputs = [x]
    h = x
    for i, block in enumerate(stack.blocks):
        if i > 0:
            h = stack.dense[i - 1](torch.cat(outputs, dim=-1))
        h = block(h, ctx, None, memory, memory_ctx)
        outputs.append(h)
    torch.testing.assert_close(out.hidden, stack.final_norm(h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_learned_positions_start_at_zero(arch):
    """A length-T input uses exactly rows 0..T-1 of each learned position table."""
    model = make_model(arch=arch, position="learned")
    ids, tgt = rand_ids(2, 6), rand_ids(2, 6, seed=3)
    run(model, ids, tgt).pow(2).sum().backward()
    for embed in (model.encoder_embed, model.decoder_embed):
        if embed is None:
            continue
        used = embed.positions.weight.grad.abs().sum(-1) > 0
        assert used.tolist() == [True] * 6 + [False] * (P - 6)


def test_tied_and_untied_embeddings():
    for arch in ARCHS:
        tied = make_model(arch=arch, tie_embeddings=True)
        assert tied.head.proj.weight is tied.token_embedding.weight
        untied = make_model(arch=arch, tie_embeddings=False)
        assert untied.head.proj.weight is not untied.token_embedding.weight
        assert untied.head.proj.weight.data_ptr() != untied.token_embedding.weight.data_ptr()


def test_last_only_matches_full_logits():
    model = make_model()
    ids = rand_ids(2, 9)
    full = model(ids).logits
    last = model(ids, last_only=True).logits
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


def test_labels_are_not_shifted_and_minus_100_ignored():
    model = make_model()
    ids = rand_ids(1, 6)
    labels = torch.full((1, 6), -100)
    labels[0, 2] = 7
    out = model(ids, labels=labels)
    expected = -out.logits[0, 2].log_softmax(-1)[7]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_explicit_position_ids_match_default():
    for position in ("learned", "sinusoidal", "rope"):
        model = make_model(position=position)
        ids = rand_ids(2, 8)
        torch.testing.assert_close(
            model(ids, position_ids=torch.arange(8)[None].expand(2, 8)).logits, model(ids).logits, atol=1e-6, rtol=0
        )
        spread = model(ids, position_ids=2 * torch.arange(8)[None]).logits  # also changes RoPE's offsets
        assert (spread - model(ids).logits).abs().max() > 1e-4  # positions are actually used


def test_segment_embeddings_change_encoder_output():
    model = make_model(arch="encoder", type_vocab_size=2, embedding_norm=True)
    ids = rand_ids(2, 8)
    zeros = torch.zeros(2, 8, dtype=torch.long)
    ones = torch.ones(2, 8, dtype=torch.long)
    torch.testing.assert_close(model(ids).logits, model(ids, token_type_ids=zeros).logits, atol=0, rtol=0)
    assert (model(ids, token_type_ids=ones).logits - model(ids).logits).abs().max() > 1e-3


def test_scale_attn_by_inverse_layer_idx():
    """Scores of layer i are divided by i + 1: a no-op for the first layer only."""
    ids = rand_ids(2, 8)
    one_a, one_b = make_model(n_layer=1), make_model(n_layer=1, scale_attn_by_inverse_layer_idx=True)
    torch.testing.assert_close(one_a(ids).logits, one_b(ids).logits, atol=0, rtol=0)
    two_a, two_b = make_model(n_layer=2), make_model(n_layer=2, scale_attn_by_inverse_layer_idx=True)
    assert (two_a(ids).logits - two_b(ids).logits).abs().max() > 1e-4


def test_encoder_output_reuse_matches_reencoding():
    model = make_model(arch="encoder-decoder", position="rope")
    src, tgt = rand_ids(2, 7), rand_ids(2, 5, seed=3)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out = model(src, attention_mask=mask, decoder_input_ids=tgt)
    enc = model.encode(src, mask)
    torch.testing.assert_close(enc, out.encoder_output, atol=0, rtol=0)
    again = model(src, attention_mask=mask, decoder_input_ids=tgt, encoder_output=enc)
    torch.testing.assert_close(again.logits, out.logits, atol=1e-6, rtol=0)
    # and the decoder does read the source
    other = model(different_tokens(src), attention_mask=mask, decoder_input_ids=tgt).logits
    assert (other - out.logits).abs().max() > 1e-3


def test_residual_projection_init_is_scaled_by_depth():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, block_size=16))
    base = 0.02
    scaled = base / math.sqrt(2 * 2)
    for i in range(2):
        blk = model.decoder.blocks[i]
        assert blk.attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert blk.ffn.down.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert blk.attn.qkv.weight.std().item() == pytest.approx(base, rel=0.1)
        assert blk.ffn.up.weight.std().item() == pytest.approx(base, rel=0.1)
        assert (blk.attn.qkv.bias == 0).all()
    assert model.token_embedding.weight.std().item() == pytest.approx(base, rel=0.1)


# =========================================================================== 2-3. causality, bidirectionality


def _embedding_grad(model: LanguageModel, ids, tgt, out_pos: int) -> torch.Tensor:
    """d(logits at out_pos) / d(the last token-embedding call's output): who influences out_pos."""
    captured = []

    def hook(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)
        return output

    handle = model.token_embedding.register_forward_hook(hook)
    try:
        logits = run(model, ids, tgt)
    finally:
        handle.remove()
    logits[:, out_pos].pow(2).sum().backward()
    return captured[-1].grad  # decoder input is embedded last for encoder-decoder


CAUSAL_VARIANTS = [dict(position=p) for p in POSITIONS] + [
    dict(position="rope", n_kv_head=1, dense_connections=True, norm_position="post", activation="swiglu"),
    dict(position="alibi", n_kv_head=2, norm="rmsnorm", dense_connections=True),
]


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("kw", CAUSAL_VARIANTS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_causality(arch, kw):
    model = make_model(arch=arch, **kw)
    T = 11
    src = rand_ids(2, 6, seed=9)
    ids = rand_ids(2, T)
    dec = lambda x: run(model, src, x) if arch == "encoder-decoder" else run(model, x)  # noqa: E731
    base = dec(ids)
    for t in (1, 4, 10):
        changed = ids.clone()
        changed[:, t:] = different_tokens(ids[:, t:], seed=t)
        out = dec(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3  # the change is visible where allowed
    # gradient form: logits at position t depend on no embedding after t, on all before
    model.zero_grad()
    t = 5
    grad = _embedding_grad(model, src, ids, t) if arch == "encoder-decoder" else _embedding_grad(model, ids, None, t)
    assert grad.shape == (2, T, D)
    assert (grad[:, t + 1 :] == 0).all()
    assert (grad[:, : t + 1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("position", POSITIONS)
def test_causality_with_left_padding(position):
    model = make_model(position=position)
    ids = rand_ids(2, 10)
    mask = torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10])
    base = model(ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[:, 6:] = different_tokens(ids[:, 6:])
    out = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :6], base[:, :6], atol=1e-6, rtol=0)
    assert (out[:, 6] - base[:, 6]).abs().max() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_is_bidirectional(position):
    model = make_model(arch="encoder", position=position)
    ids = rand_ids(2, 9)
    base = model(ids).logits
    changed = ids.clone()
    changed[:, -1] = different_tokens(ids[:, -1])
    out = model(changed).logits
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-3
    assert (out[:, 4] - base[:, 4]).abs().max() > 1e-3
    model.zero_grad()
    grad = _embedding_grad(model, ids, None, 0)
    assert (grad.abs().sum(-1) > 0).all()  # position 0 depends on every token


@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_decoder_decoder_sees_whole_source(position):
    model = make_model(arch="encoder-decoder", position=position)
    src, tgt = rand_ids(2, 8), rand_ids(2, 5, seed=3)
    base = run(model, src, tgt)
    changed = src.clone()
    changed[:, -1] = different_tokens(src[:, -1])
    out = run(model, changed, tgt)
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-4  # first target token sees the last source token


# =========================================================================== 4. padding invariance

PAD_VARIANTS = [dict(position=p) for p in POSITIONS] + [
    dict(position="rope", n_kv_head=2, dense_connections=True, norm_position="post"),
    dict(position="relative", n_kv_head=1, activation="swiglu", norm="rmsnorm"),
]
_pad_ids = lambda kw: "-".join(map(str, kw.values()))  # noqa: E731


@pytest.mark.parametrize("kw", PAD_VARIANTS, ids=_pad_ids)
def test_decoder_left_padding_invariance(kw):
    model = make_model(**kw)
    a, b = rand_ids(1, 7, seed=1), rand_ids(1, 11, seed=2)
    pad = rand_ids(1, 4, seed=3)  # arbitrary pad tokens: the mask, not the id, must hide them
    ids = torch.cat([torch.cat([pad, a], 1), b])
    mask = torch.tensor([[0] * 4 + [1] * 7, [1] * 11])
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 4:], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], model(b).logits[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()  # padding rows are not NaN either


@pytest.mark.parametrize("kw", PAD_VARIANTS, ids=_pad_ids)
def test_encoder_right_padding_invariance(kw):
    model = make_model(arch="encoder", **kw)
    a, b = rand_ids(1, 6, seed=1), rand_ids(1, 10, seed=2)
    ids = torch.cat([torch.cat([a, rand_ids(1, 4, seed=3)], 1), b])
    mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0, :6], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], model(b).logits[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kw", PAD_VARIANTS, ids=_pad_ids)
def test_encoder_decoder_padding_invariance(kw):
    """Right-padded source and left-padded target together."""
    model = make_model(arch="encoder-decoder", **kw)
    sa, sb = rand_ids(1, 5, seed=1), rand_ids(1, 9, seed=2)
    ta, tb = rand_ids(1, 4, seed=4), rand_ids(1, 7, seed=5)
    src = torch.cat([torch.cat([sa, rand_ids(1, 4, seed=3)], 1), sb])
    src_mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    tgt = torch.cat([torch.cat([rand_ids(1, 3, seed=6), ta], 1), tb])
    tgt_mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    out = model(src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    torch.testing.assert_close(out.logits[0, 3:], run(model, sa, ta)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1], run(model, sb, tb)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.encoder_output[0, :5], model.encode(sa)[0], atol=1e-5, rtol=0)


# =========================================================================== 5. KV cache


def _cached_logits(model, ids, mask, chunks, src=None, src_mask=None, cache_len=None):
    """Feed `ids` through a cache in the given chunk sizes; concatenate the logits."""
    B, T = ids.shape
    assert sum(chunks) == T
    cache = model.new_cache(B, cache_len or T)
    assert isinstance(cache, KVCache) and cache.length == 0
    outs, start, enc = [], 0, None
    for n in chunks:
        end = start + n
        kw = dict(cache=cache)
        if mask is not None:
            kw["attention_mask" if src is None else "decoder_attention_mask"] = mask[:, :end]
        if src is None:
            out = model(ids[:, start:end], **kw)
        else:
            out = model(src, attention_mask=src_mask, decoder_input_ids=ids[:, start:end], encoder_output=enc, **kw)
            enc = out.encoder_output
        outs.append(out.logits)
        assert cache.length == end
        start = end
    return torch.cat(outs, 1), cache


CHUNKS = [4, 1, 1, 3, 1, 1, 1]  # prefill, single steps, and a multi-token chunk after a prefix


@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_matches_full_forward(position):
    model = make_model(position=position)
    ids = rand_ids(2, 12)
    full = model(ids).logits
    cached, _ = _cached_logits(model, ids, None, CHUNKS, cache_len=16)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    step, _ = _cached_logits(model, ids, None, [1] * 12)  # from the very first token
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "alibi", "relative", "learned"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_kv_cache_with_gqa(position, n_kv_head):
    model = make_model(position=position, n_kv_head=n_kv_head)
    cache = model.new_cache(2, 12)
    assert cache.layers[0].keys.shape == (2, n_kv_head, 12, D // 4)
    ids = rand_ids(2, 12)
    cached, _ = _cached_logits(model, ids, None, CHUNKS)
    torch.testing.assert_close(cached, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_left_padded_batch(position):
    model = make_model(position=position)
    ids = rand_ids(3, 12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :5] = 0
    full = model(ids, attention_mask=mask).logits
    cached, _ = _cached_logits(model, ids, mask, [6, 1, 1, 2, 1, 1])
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)
    # and each row matches its unpadded self
    alone = model(ids[2:, 5:]).logits
    torch.testing.assert_close(cached[2, 5:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(dense_connections=True, n_layer=3, position="rope"),
        dict(dense_connections=True, position="alibi", norm_position="post", activation="swiglu"),
        dict(n_kv_head=2, norm="rmsnorm", scale_attn_by_inverse_layer_idx=True, position="relative"),
    ],
    ids=["dense-rope", "dense-alibi-post", "gqa-rms-scaled-relative"],
)
def test_kv_cache_other_options(kw):
    model = make_model(**kw)
    ids = rand_ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0
    full = model(ids, attention_mask=mask).logits
    cached, _ = _cached_logits(model, ids, mask, [3, 1, 1, 1, 2, 1, 1])
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


ENC_DEC_CACHE = [dict(position=p) for p in POSITIONS] + [
    dict(position="rope", n_kv_head=1, norm_position="post"),
    dict(position="alibi", n_kv_head=2, dense_connections=True, activation="swiglu"),
]


@pytest.mark.parametrize("kw", ENC_DEC_CACHE, ids=_pad_ids)
def test_kv_cache_encoder_decoder(kw):
    model = make_model(arch="encoder-decoder", n_decoder_layer=3, **kw)
    src = rand_ids(2, 8, seed=7)
    src_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    tgt = rand_ids(2, 9)
    tgt_mask = torch.ones(2, 9, dtype=torch.long)
    tgt_mask[0, :2] = 0
    full = model(src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask).logits
    cached, cache = _cached_logits(model, tgt, tgt_mask, [3, 1, 1, 2, 1, 1], src=src, src_mask=src_mask)
    torch.testing.assert_close(cached[tgt_mask.bool()], full[tgt_mask.bool()], atol=1e-5, rtol=0)
    assert len(cache.layers) == 3
    assert all(layer.cross is not None for layer in cache.layers)


def test_cross_attention_cache_is_computed_once():
    """After the first step the cross keys/values come from the cache, not from encoder_output."""
    model = make_model(arch="encoder-decoder", position="rope")
    src, tgt = rand_ids(1, 6, seed=7), rand_ids(1, 5)
    full = run(model, src, tgt)
    cache = model.new_cache(1, 5)
    first = model(src, decoder_input_ids=tgt[:, :2], cache=cache)
    cross_k = [layer.cross[0].clone() for layer in cache.layers]
    rest = []
    for t in range(2, 5):  # a bogus encoder output: must be ignored in favour of the cache
        out = model(src, decoder_input_ids=tgt[:, t : t + 1], cache=cache, encoder_output=torch.zeros(1, 6, D))
        rest.append(out.logits)
    torch.testing.assert_close(torch.cat([first.logits, *rest], 1), full, atol=1e-5, rtol=0)
    for layer, k in zip(cache.layers, cross_k, strict=True):
        torch.testing.assert_close(layer.cross[0], k, atol=0, rtol=0)


def test_kv_cache_reorder():
    model = make_model(position="rope")
    ids = rand_ids(2, 8)
    cache = model.new_cache(2, 8)
    model(ids[:, :5], cache=cache)
    cache.reorder(torch.tensor([1, 0]))
    swapped = ids.flip(0)
    steps = [model(swapped[:, t : t + 1], cache=cache).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), model(swapped).logits[:, 5:], atol=1e-5, rtol=0)


def test_kv_cache_last_only_and_overflow():
    model = make_model(position="alibi")
    ids = rand_ids(2, 6)
    cache = model.new_cache(2, 6)
    out = model(ids, cache=cache, last_only=True)
    torch.testing.assert_close(out.logits, model(ids).logits[:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        model(ids[:, :1], cache=cache)


# =========================================================================== 7. GPT-2 parity


def _gpt2_pair(scale_by_layer: bool):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        scale_attn_by_inverse_layer_idx=scale_by_layer,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.1,  # peaked attention, so that the attention scale matters
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so that copying them matters
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
    cfg = ModelConfig(
        arch="decoder",
        vocab_size=100,
        block_size=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        activation="gelu_tanh",
        position="learned",
        norm="layernorm",
        norm_position="pre",
        tie_embeddings=True,
        norm_eps=1e-5,
        scale_attn_by_inverse_layer_idx=scale_by_layer,
    )
    model = LanguageModel(cfg).eval()
    sd = hf.state_dict()
    ours = {
        "token_embedding.weight": sd["transformer.wte.weight"],
        "decoder_embed.positions.weight": sd["transformer.wpe.weight"],
        "decoder.final_norm.weight": sd["transformer.ln_f.weight"],
        "decoder.final_norm.bias": sd["transformer.ln_f.bias"],
        "head.proj.weight": sd["transformer.wte.weight"],
    }
    for i in range(3):
        h, b = f"transformer.h.{i}.", f"decoder.blocks.{i}."
        for hf_name, name in [("ln_1", "attn_norm"), ("ln_2", "ffn_norm")]:
            ours[b + name + ".weight"] = sd[h + hf_name + ".weight"]
            ours[b + name + ".bias"] = sd[h + hf_name + ".bias"]
        for hf_name, name in [
            ("attn.c_attn", "attn.qkv"),
            ("attn.c_proj", "attn.proj"),
            ("mlp.c_fc", "ffn.up"),
            ("mlp.c_proj", "ffn.down"),
        ]:
            ours[b + name + ".weight"] = sd[h + hf_name + ".weight"].t()  # Conv1D stores (in, out)
            ours[b + name + ".bias"] = sd[h + hf_name + ".bias"]
    model.load_state_dict(ours, strict=True)
    assert model.head.proj.weight is model.token_embedding.weight  # still tied after loading
    return hf, model


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_gpt2_parity(scale_by_layer):
    hf, model = _gpt2_pair(scale_by_layer)
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
    assert ref.abs().max() > 0.1  # logits are not trivially tiny
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :11] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        ours = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)

    # cached decoding reproduces HF too
    cached, _ = _cached_logits(model, ids, mask, [12, 1, 1, 5, 1, 1, 1, 1, 1])
    torch.testing.assert_close(cached[real], ref[real], atol=1e-5, rtol=0)


def test_gpt2_parity_distinguishes_scale_option():
    """The option is really applied: the two HF variants disagree and we follow each."""
    hf_plain, _ = _gpt2_pair(False)
    _, ours_scaled = _gpt2_pair(True)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (hf_plain(ids).logits - ours_scaled(ids).logits).abs().max() > 1e-2


# =========================================================================== 8. counts and validation


def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def test_num_parameters_gpt_style():
    model = make_model(n_layer=2)  # decoder, learned, gelu, layernorm with bias, tied
    ln = 2 * D
    block = 2 * ln + _lin(D, 3 * D) + _lin(D, D) + _lin(D, 4 * D) + _lin(4 * D, D)
    expected = V * D + P * D + 2 * block + ln  # tied head counted once
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - P * D  # the tied table is the head


def test_num_parameters_llama_style():
    model = make_model(
        tie_embeddings=False, norm="rmsnorm", bias=False, activation="swiglu", n_kv_head=2, position="rope"
    )
    hd = D // 4
    ff = int(8 * D / 3 + 63) // 64 * 64
    assert model.config.ffn_width == ff == 128
    block = 2 * D + D * (D + 2 * 2 * hd) + D * D + D * 2 * ff + ff * D
    expected = V * D + V * D + 2 * block + D
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - V * D


def test_num_parameters_bert_style():
    model = make_model(
        arch="encoder",
        type_vocab_size=2,
        embedding_norm=True,
        norm_position="post",
        position="relative",
        relative_distance=4,
    )
    hd = D // 4
    ln = 2 * D
    block = 2 * ln + _lin(D, 3 * D) + _lin(D, D) + _lin(D, 4 * D) + _lin(4 * D, D) + (2 * 4 + 1) * hd
    head = _lin(D, D) + ln + V  # dense, norm, output bias (weight tied)
    expected = V * D + 2 * D + ln + 2 * block + head  # no final norm for post-norm
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - 2 * D


def test_num_parameters_encoder_decoder_dense():
    model = make_model(arch="encoder-decoder", n_layer=2, n_decoder_layer=3, dense_connections=True)
    ln = 2 * D
    self_block = 2 * ln + _lin(D, 3 * D) + _lin(D, D) + _lin(D, 4 * D) + _lin(4 * D, D)
    cross = ln + _lin(D, D) + _lin(D, 2 * D) + _lin(D, D)
    encoder = 2 * self_block + _lin(2 * D, D) + ln
    decoder = 3 * (self_block + cross) + _lin(2 * D, D) + _lin(3 * D, D) + ln
    expected = V * D + 2 * P * D + encoder + decoder
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - 2 * P * D


def test_gqa_has_fewer_parameters():
    mha, gqa = make_model(), make_model(n_kv_head=1)
    hd = D // 4
    assert gqa.num_parameters() < mha.num_parameters()
    assert mha.num_parameters() - gqa.num_parameters() == 2 * 2 * (4 - 1) * hd * (D + 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seq_len", [None, 1, 16])
def test_flops_per_token(arch, seq_len):
    model = make_model(arch=arch)
    train = model.flops_per_token(seq_len, training=True)
    infer = model.flops_per_token(seq_len, training=False)
    assert train == 3 * infer
    n_blocks = 2 if arch != "encoder-decoder" else 4
    T = seq_len or P
    assert infer == 2 * model.num_parameters(exclude_embeddings=True) + 4 * n_blocks * D * T
    assert model.flops_per_token(32) > model.flops_per_token(8)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_embd=30, n_head=4),
        dict(position="absolute"),
        dict(n_head=4, n_kv_head=3),
        dict(position="rope", n_embd=36, n_head=4),  # head dim 9
        dict(position="sinusoidal", n_embd=33, n_head=3),
        dict(arch="gpt"),
        dict(activation="tanh"),
        dict(norm="batchnorm"),
        dict(norm_position="sandwich"),
        dict(dropout=1.0),
        dict(attn_dropout=-0.1),
        dict(n_layer=0),
        dict(vocab_size=0),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_configs_raise(kw):
    with pytest.raises(LmforgeError):
        ModelConfig(**kw)


def test_valid_edge_configs_build():
    ModelConfig(position="rope", n_embd=40, n_head=4)  # head dim 10 is even
    ModelConfig(n_head=6, n_kv_head=3, n_embd=48)
    assert ModelConfig(n_head=4).kv_heads == 4
    for act in ACTIVATIONS:
        ModelConfig(activation=act)


# =========================================================================== 9. dropout, 10. determinism


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "drop", [dict(dropout=0.2), dict(attn_dropout=0.3), dict(dropout=0.1, attn_dropout=0.1)], ids=str
)
def test_dropout_train_stochastic_eval_deterministic(arch, drop):
    model = make_model(arch=arch, **drop)
    ids, tgt = rand_ids(2, 9), rand_ids(2, 6, seed=3)
    model.train()
    torch.manual_seed(10)
    a = run(model, ids, tgt)
    b = run(model, ids, tgt)
    assert (a - b).abs().max() > 1e-4
    torch.manual_seed(10)
    torch.testing.assert_close(run(model, ids, tgt), a, atol=0, rtol=0)  # same seed, same masks
    model.eval()
    c, d = run(model, ids, tgt), run(model, ids, tgt)
    torch.testing.assert_close(c, d, atol=0, rtol=0)
    # in eval mode the model is exactly the dropout-free one
    plain = make_model(arch=arch)
    torch.testing.assert_close(c, run(plain, ids, tgt), atol=0, rtol=0)


def test_no_dropout_train_mode_is_deterministic():
    model = make_model(arch="encoder-decoder").train()
    ids, tgt = rand_ids(2, 9), rand_ids(2, 6)
    torch.testing.assert_close(run(model, ids, tgt), run(model, ids, tgt), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights(arch):
    kw = dict(arch=arch, position="relative", dense_connections=True, type_vocab_size=2)
    a, b, c = make_model(seed=5, **kw), make_model(seed=5, **kw), make_model(seed=6, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["token_embedding.weight"], sc["token_embedding.weight"])
    ids = rand_ids(1, 6)
    torch.testing.assert_close(run(a, ids, ids), run(b, ids, ids), atol=0, rtol=0)
