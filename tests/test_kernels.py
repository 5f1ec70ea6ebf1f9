"""lmforge's decoding kernel (lmforge/kernels.py, csrc/small_matmul.cpp): its products against
torch's for awkward shapes, when the model's Linear uses it and when it must not, and decoding
with it against decoding without it. Then every way the kernels can be unavailable (missing
header, no compiler, unwritable cache, compile error, damaged library, no AVX2), each through
the real build path: one warning (none when switched off or without AVX2) and torch's numbers."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)

from lmforge import kernels
from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.hardware import CAPABILITY_OVERRIDE
from lmforge.model import LanguageModel
from lmforge.model.linear import Linear


@pytest.fixture
def kernel():
    if not kernels.available():
        pytest.skip("lmforge's CPU kernel cannot be built here")


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 32])  # one dot per row, then tiles of 4, 2 and 1 rows
@pytest.mark.parametrize("k", [7, 8, 40, 77, 256])  # below, at, between and above the 8- and 32-wide steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("n", [13, 14, 99])  # groups of 3 weight rows, then 1, 2 or none left over
def test_small_matmul_matches_torch(kernel, rows, k, dtype, n):
    g = torch.Generator().manual_seed(k * 10 + rows)
    x = torch.randn(rows, k, generator=g)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scales, bias = torch.rand(n, generator=g), torch.randn(n, generator=g)
    else:
        w, scales, bias = torch.randn(n, k, generator=g), None, None
    expected = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()  # what float32 rounding scales with
    if scales is not None:
        expected = expected * scales.double() + bias.double()
        magnitude = magnitude * scales.double()
    out = kernels.small_matmul(x, w, scales, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    error = (out.double() - expected).abs()
    assert (error <= 2e-6 * magnitude + 1e-6).all(), (error / magnitude).max()


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


# --------------------------------------------------------------------------- when they cannot be used


def run_tiny_model() -> tuple[torch.Tensor, list[torch.Tensor], list[list[int]]]:
    """A tiny model's loss, gradients and greedy continuation: every path a kernel can take
    (attention and GELU in training, the products and the fused block in decoding)."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=32, init_std=0.2,
                                      tie_embeddings=False))
    ids = torch.randint(0, 40, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    tokens = [tokens for tokens, _ in decode_steps(model.eval(), [[3, 1, 4], [1, 5]], config)]
    return loss.detach(), gradients, tokens


@pytest.fixture(scope="module")
def torch_only():
    """run_tiny_model() with the kernels switched off: what every fallback below must give."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_KERNELS", "0")
        mp.setattr(kernels, "_available", None)
        return run_tiny_model()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The next kernels.available() builds again, on an AVX2 CPU as far as lmforge can tell (on
    any machine), into an empty cache folder: whatever a test breaks then really is met by _build."""
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv(CAPABILITY_OVERRIDE, "AVX2")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    return monkeypatch


def assert_runs_on_torch(torch_only, warning: str | None) -> None:
    """The tiny model gives torch_only's numbers exactly, with kernels.available() False and
    one "CPU kernels unavailable" warning containing `warning` (None: no warning at all)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, gradients, tokens = run_tiny_model()
    messages = [str(w.message) for w in caught]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and messages[0].startswith("lmforge: CPU kernels unavailable ("), messages
        assert warning in messages[0], messages[0]
    assert kernels.available() is False
    expected_loss, expected_gradients, expected_tokens = torch_only
    assert torch.equal(loss, expected_loss) and tokens == expected_tokens
    assert all(map(torch.equal, gradients, expected_gradients))


def keep_only(monkeypatch, tmp_path, names: list[str], replace: str | None = None):
    """Points kernels at a copy of csrc holding only these files (each replaced by `replace` if given)."""
    copy = tmp_path / "csrc"
    copy.mkdir()
    for name in names:
        if replace is None:
            shutil.copy(kernels.CSRC / name, copy / name)
        else:
            (copy / name).write_text(replace)
    monkeypatch.setattr(kernels, "SOURCES", [copy / path.name for path in kernels.SOURCES])
    monkeypatch.setattr(kernels, "HEADERS", [copy / path.name for path in kernels.HEADERS])


def test_sources_without_their_headers(fresh_build, tmp_path, torch_only):
    """The wheel of the bug report: package-data shipped csrc/*.cpp only, and reading the headers
    for the cache folder's name raised before anything could catch it."""
    keep_only(fresh_build, tmp_path, [path.name for path in kernels.SOURCES])
    assert_runs_on_torch(torch_only, warning="vec_math.h")


def test_no_compiler(fresh_build, torch_only):
    fresh_build.setenv("CXX", "/nonexistent/c++")
    assert_runs_on_torch(torch_only, warning="no C++ compiler: '/nonexistent/c++' not found")


def test_a_cache_folder_that_cannot_be_created(fresh_build, tmp_path, torch_only):
    """A path under a regular file: mkdir fails even for root, whom permissions would not stop."""
    (tmp_path / "a-file").write_text("")
    fresh_build.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a-file" / "torch_extensions"))
    assert_runs_on_torch(torch_only, warning="Not a directory")


def test_a_compile_error(fresh_build, tmp_path, torch_only):
    """Sources that do not compile, through torch's builder and the real compiler (every one of
    them broken, so that ninja stops at once instead of finishing the others' ~40 s)."""
    if not all(shutil.which(tool) for tool in ("c++", "ninja")):
        pytest.skip("no C++ compiler or ninja here to fail with")
    names = [path.name for path in kernels.SOURCES + kernels.HEADERS]
    keep_only(fresh_build, tmp_path, names, replace="#error deliberately broken for lmforge's tests\n")
    assert_runs_on_torch(torch_only, warning=": error: ")  # the compiler's own line (on ARM: about -mavx2)


def test_a_damaged_library_is_rebuilt_not_loaded(fresh_build, torch_only):
    """A cached library that does not load (a build killed while linking) sends lmforge to the
    builder, which here finds no compiler: still one warning, and torch's operators."""
    folder = kernels._build_directory()
    folder.mkdir(parents=True)
    (folder / f"{kernels.LIBRARY}.so").write_bytes(b"not a shared library")
    fresh_build.setenv("CXX", "/nonexistent/c++")
    assert_runs_on_torch(torch_only, warning="no C++ compiler")


@pytest.mark.parametrize("setting", [("LMFORGE_KERNELS", "0"), (CAPABILITY_OVERRIDE, "DEFAULT"),
                                     (CAPABILITY_OVERRIDE, "NEON"), (CAPABILITY_OVERRIDE, "SVE256")])
def test_switched_off_or_no_avx2_is_silent(fresh_build, torch_only, setting):
    """No build is even tried (it would warn: there is no compiler either), and nothing is said."""
    fresh_build.setenv(*setting)
    fresh_build.setenv("CXX", "/nonexistent/c++")
    assert_runs_on_torch(torch_only, warning=None)


def test_a_cached_library_is_loaded_without_the_builder(kernel, monkeypatch):
    """The cache folder is named by a digest of the code, so its library is loaded as it is: an
    installed wheel reuses the source tree's build (tests/test_install.py) instead of rebuilding it."""
    import torch.utils.cpp_extension

    def no_builder(*args, **kwargs):
        raise AssertionError("torch's builder was called for a library already in the cache")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_builder)
    monkeypatch.setattr(kernels, "_available", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available() is True
