"""lmforge's decoding kernel (lmforge/kernels.py, csrc/small_matmul.cpp): its products against
torch's for awkward shapes, when the model's Linear uses it and when it must not, the build's
fallbacks, and decoding with it against decoding without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.model import LanguageModel
from lmforge.model.linear import Linear


@pytest.fixture
def kernel():
    if not kernels.available():
        pytest.skip("lmforge's CPU kernel cannot be built here")


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 32])  # one dot per row, then tiles of 4, 2 and 1 rows
@pytest.mark.parametrize("k", [7, 8, 40, 77, 256])  # below, at, between and above the 8- and 32-wide steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_small_matmul_matches_torch(kernel, rows, k, dtype):
    g = torch.Generator().manual_seed(k * 10 + rows)
    x = torch.randn(rows, k, generator=g)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (13, k), generator=g, dtype=torch.int8)
        scales, bias = torch.rand(13, generator=g), torch.randn(13, generator=g)
    else:
        w, scales, bias = torch.randn(13, k, generator=g), None, None
    expected = x.double() @ w.double().t()
    if scales is not None:
        expected = expected * scales.double() + bias.double()
    out = kernels.small_matmul(x, w, scales, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, 13)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_small_matmul_keeps_leading_dimensions(kernel):
    x, w, b = torch.randn(2, 1, 16), torch.randn(5, 16), torch.randn(5)
    torch.testing.assert_close(kernels.small_matmul(x, w, bias=b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_small_matmul_rejects_bad_input(kernel):
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.small_matmul(torch.randn(1, 8), torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="length N"):
        kernels.small_matmul(torch.randn(1, 8), torch.randn(4, 8), bias=torch.randn(3))


def count_kernel_calls(monkeypatch) -> list:
    calls = []
    real = kernels.small_matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "small_matmul", spy)
    return calls


def test_linear_uses_the_kernel_only_for_inference_on_few_rows(kernel, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    layer = Linear(16, 8)
    few, many = torch.randn(3, 16), torch.randn(kernels.MAX_ROWS + 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        layer(many)
    assert len(calls) == 1  # `many` went to F.linear
    out = layer(few)  # autograd on: the kernel has no backward
    out.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(True)
    layer(few).sum().backward()  # only the bias is trained: still F.linear
    assert len(calls) == 1


def test_greedy_decoding_is_the_same_with_and_without_the_kernel(kernel, monkeypatch):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=40,
                                      init_std=0.2, tie_embeddings=False)).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    config = GenerationConfig(max_new_tokens=20, temperature=0)
    calls = count_kernel_calls(monkeypatch)
    with_kernel = [tokens for tokens, _ in decode_steps(model, prompts, config)]
    assert calls  # the decode steps did go through the kernel
    monkeypatch.setattr(kernels, "_available", False)
    without = [tokens for tokens, _ in decode_steps(model, prompts, config)]
    assert with_kernel == without


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    assert kernels._build() is False


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    monkeypatch.setattr(kernels, "_build_directory", lambda: tmp_path)
    with pytest.warns(UserWarning, match="Ninja is required"):
        assert kernels._build() is False
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setattr(kernels, "_build", lambda: False)
    layer = Linear(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(1, 4)), F.linear(torch.ones(1, 4), layer.weight, layer.bias))
