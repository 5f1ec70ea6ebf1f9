"""lmforge's training kernels (csrc/attention.cpp, csrc/gelu.cpp): values and gradients against
float64 references, odd shapes and strides, when the model uses them and when it must not, a
whole model trained with them against the same model without, and the same under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.model import LanguageModel
from lmforge.model.attention import Attention
from lmforge.model.layers import GELU


@pytest.fixture
def kernel():
    if not kernels.available():
        pytest.skip("lmforge's CPU kernels cannot be built here")


def reference_attention(q, k, v, scale):
    """(B, T, H, D) causal attention in float64 through SDPA's math path."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


# T: one row, shorter than a row block, across block edges; D: not a multiple of 8; GQA and MQA
@pytest.mark.parametrize("B,T,H,KH,D", [(1, 1, 2, 2, 8), (2, 5, 2, 1, 12), (3, 33, 4, 2, 32), (2, 130, 6, 6, 20),
                                        (1, 64, 4, 1, 64)])
def test_attention_matches_float64_reference(kernel, B, T, H, KH, D):
    g = torch.Generator().manual_seed(T * 100 + D)
    fused = torch.randn(B, T, (H + 2 * KH) * D, generator=g, dtype=torch.float64)  # a qkv projection
    grad_out = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    scale = 0.7 / D**0.5

    def run(x, op):
        x = x.clone().requires_grad_()
        q, k, v = x.split([H * D, KH * D, KH * D], dim=-1)  # strided views, as the model passes them
        out = op(q.view(B, T, H, D), k.view(B, T, KH, D), v.view(B, T, KH, D), scale)
        out.backward(grad_out.to(out.dtype))
        return out.double(), x.grad.double()

    out, grad = run(fused.float(), torch.ops.lmforge.causal_attention)
    want_out, want_grad = run(fused, reference_attention)
    torch.testing.assert_close(out, want_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=5e-5)


def test_attention_rejects_what_it_cannot_take(kernel):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="must be float32 CPU tensors"):
        torch.ops.lmforge.causal_attention(q.double(), q.double(), q.double(), 1.0)
    with pytest.raises(RuntimeError, match="must be float32 CPU tensors"):  # head_dim not contiguous
        torch.ops.lmforge.causal_attention(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3), 1.0)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.lmforge.causal_attention(torch.randn(1, 4, 3, 8), q, q, 1.0)


def test_gelu_matches_float64_reference(kernel):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 101, generator=g) * 4).t()  # non-contiguous, odd length: the tail path
    grad_out = torch.randn(101, 37, generator=g)
    ours = x.clone().requires_grad_()
    ref = x.double().requires_grad_()
    out = torch.ops.lmforge.gelu(ours)
    want = F.gelu(ref)
    out.backward(grad_out)
    want.backward(grad_out.double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=0, atol=2e-6)
    with torch.no_grad():  # without autograd no derivative is stored, the values are the same
        assert torch.equal(torch.ops.lmforge.gelu(x), out.detach())


def test_gelu_module_falls_back_to_torch_off_float32(kernel):
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(GELU()(x), F.gelu(x), rtol=0, atol=0)


def test_operators_agree_with_their_registrations(kernel):
    """torch.library.opcheck: schema, shape-only (fake) versions, autograd registration and
    AOTAutograd tracing agree with what the kernels compute. torch.compile relies on all four to
    keep the kernels in its graphs."""
    B, T, H, KH, D = 2, 37, 4, 2, 16
    fused = torch.randn(B, T, (H + 2 * KH) * D, requires_grad=True)
    q, k, v = fused.split([H * D, KH * D, KH * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KH, D), v.view(B, T, KH, D)
    plain = [t.detach() for t in (q, k, v)]
    out, lse = torch.ops.lmforge.causal_attention_forward(*plain, 0.25)
    ops = torch.ops.lmforge
    cases = [(ops.causal_attention.default, (q, k, v, 0.25)),
             (ops.causal_attention_forward.default, (*plain, 0.25)),
             (ops.causal_attention_backward.default, (torch.randn_like(out), *plain, out, lse, 0.25)),
             (ops.gelu.default, (torch.randn(5, 7, requires_grad=True),)),
             (ops.gelu_with_slope.default, (torch.randn(5, 7),)),
             (ops.small_matmul.default, (torch.randn(3, 24), torch.randn(10, 24), None, torch.randn(10))),
             (ops.small_matmul.default, (torch.randn(2, 24), torch.randint(-127, 128, (10, 24), dtype=torch.int8),
                                         torch.rand(10), None))]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def operators_run(step) -> set[str]:
    """Names of the operators that ran during step() (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    return {event.key for event in prof.key_averages()}


def test_compiled_model_keeps_the_kernels(kernel):
    """Under torch.compile the model's graph holds the kernels' own operators (not torch's
    attention and GELU), in one graph, and its loss and gradients are the eager model's."""
    ids = torch.randint(0, 40, (3, 29), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(model):
        losses = []

        def step():
            losses.append(model(ids, labels=ids).loss)
            losses[0].backward()

        ran = operators_run(step)
        return losses[0].detach(), {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}, ran

    eager = small_model(position="learned", activation="gelu").train()
    compiled = small_model(position="learned", activation="gelu").train()
    want_loss, want_grads, _ = loss_and_grads(eager)
    torch._dynamo.reset()
    # aot_eager: AOTAutograd traces forward and backward as inductor would, without generating code
    loss, grads, ran = loss_and_grads(torch.compile(compiled, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    assert {"lmforge::causal_attention_forward", "lmforge::causal_attention_backward",
            "lmforge::gelu_with_slope"} <= ran
    assert not any("scaled_dot_product" in name or name == "aten::gelu" for name in ran)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_switching_the_kernels_off_reaches_compiled_code(kernel, monkeypatch):
    """available() is a guarded read under torch.compile, not a constant baked into the graph:
    the tests' way of comparing paths (kernels._available = False) must recompile."""
    model = small_model(position="learned", activation="gelu").train()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 40, (2, 20))

    def kernels_run() -> set[str]:
        ran = operators_run(lambda: compiled(ids, labels=ids).loss.backward())
        return {name for name in ran if name.startswith("lmforge::")}

    torch._dynamo.reset()
    try:
        assert "lmforge::causal_attention_backward" in kernels_run()
        monkeypatch.setattr(kernels, "_available", False)
        assert kernels_run() == set()
    finally:
        torch._dynamo.reset()


def test_second_derivatives_are_refused_not_wrong(kernel):
    """The kernels' backward passes are not differentiable themselves; create_graph=True must
    raise instead of returning a second derivative with terms missing."""
    q = torch.randn(1, 6, 2, 8, requires_grad=True)
    out = torch.ops.lmforge.causal_attention(q, q, q, 0.3)
    with pytest.raises(RuntimeError, match="attention kernel has no second derivative"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="GELU kernel has no second derivative"):
        torch.autograd.grad(torch.ops.lmforge.gelu(x).sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(torch.ops.lmforge.gelu(x).sum(), x)  # first derivatives as before
    torch.testing.assert_close(grad, torch.autograd.grad(F.gelu(x).sum(), x)[0], rtol=0, atol=2e-6)


def small_model(**options) -> LanguageModel:
    torch.manual_seed(0)
    config = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.1, **options)
    return LanguageModel(ModelConfig(**config))


def record_fused(monkeypatch) -> list[bool]:
    """Every _fused_fits answer, so a test knows which path the model took."""
    answers, real = [], Attention._fused_fits

    def spy(self, *args):
        answers.append(real(self, *args))
        return answers[-1]

    monkeypatch.setattr(Attention, "_fused_fits", spy)
    return answers


@pytest.mark.parametrize("options", [dict(position="learned", activation="gelu"),
                                     dict(position="rope", n_kv_head=2, activation="gelu"),
                                     dict(position="rope", norm="rmsnorm", bias=False)])
def test_model_gradients_are_the_same_with_and_without_the_kernels(kernel, monkeypatch, options):
    ids = torch.randint(0, 40, (3, 29), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model = small_model(**options).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    answers = record_fused(monkeypatch)
    loss, grads = loss_and_grads()
    assert answers and all(answers)  # every layer took the kernel
    monkeypatch.setattr(kernels, "_available", False)
    want_loss, want_grads = loss_and_grads()
    assert answers[-1] is False
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_kernel_is_not_used_where_it_does_not_apply(kernel, monkeypatch):
    answers = record_fused(monkeypatch)
    ids = torch.randint(0, 40, (2, 10))
    model = small_model(position="alibi").eval()
    model(ids)  # a score bias
    assert not any(answers)
    answers.clear()
    model = small_model(attn_dropout=0.1).train()
    model(ids)  # attention dropout while training
    assert not any(answers)
    model.eval()(ids)  # the same model evaluating: no dropout, so the kernel
    assert answers[-1] is True
    answers.clear()
    model(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 7, [1] * 10]))  # padding needs a mask
    assert not any(answers)
    answers.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small_model().eval()(ids)  # bf16 projections
    assert not any(answers)
