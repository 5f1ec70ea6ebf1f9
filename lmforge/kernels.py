"""lmforge's CPU kernels, built on first use, with torch's own operators as the fallback.

- csrc/small_matmul.cpp: the matrix products of decoding (below).
- csrc/attention.cpp: causal self-attention, forward and backward, for training and scoring
  (PyTorch's CPU flash kernel is built for long sequences and is slowest at the short ones
  small models train on).
- csrc/gelu.cpp: exact GELU whose forward pass also stores its derivative.
- csrc/decode.cpp: a whole pre-norm decoder block for one new token per sequence, in one call
  (model/fused_decode.py), which removes eager decoding's Python and dispatch overhead.

Decoding multiplies one row per sequence (a batch of a few) by every weight matrix, so each weight
is read from memory once and used a handful of times: the speed limit is memory bandwidth. For
such shapes MKL's sgemm runs on one thread at about half the machine's read bandwidth (12 vs
24 GB/s measured on a 2-core AVX2 machine), which held GPT-2-small decoding to 21 tokens/s where
the bandwidth allows ~49. csrc/small_matmul.cpp splits the weight rows over torch's threads and
streams them with AVX2 (37 tokens/s); it also multiplies int8 weights directly (quantize.py).

They are compiled once per machine and torch version by torch's extension builder (~40 s) into
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), in a folder named by a digest of the
sources, headers, flags and torch version. A library found there is loaded as it is, so the
source tree and an installed wheel share one build instead of rebuilding it for each other's
file paths. Every kernel is a registered operator with its output shapes declared below, so
torch.compile keeps them in its graphs (the training kernels' forward and backward are operators
of their own, called by a C++ autograd Function) and fuses the operations around them.

The kernels only make things faster, so they never stop a command. Without them every model
runs on torch's own operators, with the same results to rounding:
- LMFORGE_KERNELS=0: not built, silently.
- A CPU without AVX2 (ARM, POWER, an older x86; hardware.cpu_capability(), which
  LMFORGE_CPU_CAPABILITY overrides): not built, silently. That is the normal state of such a
  machine, with nothing to fix, so a warning on every command would only be noise.
- Anything else that stops the build or the loading: a missing source or header, no C++
  compiler (CXX, default c++), no ninja, a cache folder that cannot be created or written, a
  compile error, a library that does not load. One warning, "lmforge: CPU kernels unavailable
  (<reason>); using torch's operators", and torch's operators for the rest of the process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from lmforge.hardware import cpu_capability

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "small_matmul.cpp", CSRC / "attention.cpp", CSRC / "gelu.cpp", CSRC / "decode.cpp"]
HEADERS = [CSRC / "vec_math.h", CSRC / "small_matmul.h"]
LIBRARY = "lmforge_kernels"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
# Up to this many rows the kernel beats MKL (fp32, the 48 products of GPT-2 small's layers,
# minimum of 15, one A/B run with the 4 × 3 tiles of small_matmul.h: 1 row 18 vs 34 ms, 8 rows
# 27 vs 71, 32 rows 59 vs 99, 64 rows 104 vs 148, 128 rows 203 vs 254). The switch sits at 64,
# below the largest size measured, leaving a margin for machines where MKL fares better.
MAX_ROWS = 64
# int8 weights: the alternative is dequantising the whole matrix to fp32 for MKL, so the kernel
# stays ahead longer (same products and run: 64 rows 122 vs 233 ms, 96 rows 187 vs 303, 128 rows
# 247 vs 430).
MAX_INT8_ROWS = 128
# A whole block's decoding step (csrc/decode.cpp) also saves ~30 operators' Python per block, so
# it pays beyond MAX_ROWS: beam 5 × 16 sources is 80 rows, where its products are 1.1× MKL's
# and equal at 128 (a 256-wide translation model's products, minimum of 15), and beam search
# over 320 Multi30k sentences ran 1.2–1.45× faster with the step fused up to 128 rows than up
# to 64. Measured on AVX2 only: where MKL has AVX-512 and the tiles do not, the step keeps
# MAX_ROWS.


def decode_row_limit(capability: str) -> int:
    """The most rows a fused decoding step takes on a CPU of this capability (see above)."""
    return 128 if capability == "AVX2" else MAX_ROWS


MAX_DECODE_ROWS = decode_row_limit(cpu_capability())

_available: bool | None = None


def _build_directory() -> Path:
    """One folder per source, flags and torch version, so a stale build is never loaded."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    code = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(code + " ".join(FLAGS).encode() + torch.__version__.encode())
    return root / f"{LIBRARY}_{digest.hexdigest()[:12]}"


def _build_or_load() -> None:
    """Loads this code's cached library, or compiles it first; raises whatever stops either."""
    folder = _build_directory()  # reads every source and header: a missing file fails here
    library = folder / f"{LIBRARY}.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:  # half-written by a build that was killed or is still running: torch's builder sorts it out
            pass
    compiler = os.environ.get("CXX", "c++")  # what torch's builder runs
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found; install g++ or set CXX")
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    print("lmforge: compiling the CPU kernels (once, under a minute)", file=sys.stderr, flush=True)
    load(LIBRARY, [str(path) for path in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
         build_directory=str(folder), is_python_module=False)


def _reason(exc: Exception, limit: int = 200) -> str:
    """One line saying why, for the warning: a failed build's message holds every compiler command
    and all its output, so it is the compiler's first "error:" line, or else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    line = next((line for line in lines if "error:" in line), lines[0])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _build() -> bool:
    if os.environ.get("LMFORGE_KERNELS", "1") == "0" or cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        _build_or_load()
    except Exception as exc:  # whatever went wrong, the answer is torch's operators (module docstring)
        warnings.warn(f"lmforge: CPU kernels unavailable ({_reason(exc)}); using torch's operators", stacklevel=3)
        return False

    @torch.library.register_fake("lmforge::small_matmul")
    def _(x, w, scales, bias):  # shapes only, so that torch.compile can trace through the kernel
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("lmforge::decode_block")
    def _(x, params, keys, values, length, key_mask, cos, sin, dims, numbers, cross_keys=None, cross_values=None,
          cross_mask=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lmforge::causal_attention")
    def _(q, k, v, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lmforge::causal_attention_forward")
    def _(q, k, v, scale):  # the output, and each query row's log-sum-exp (B, heads, T)
        return q.new_empty(q.shape), q.new_empty(q.shape[0], q.shape[2], q.shape[1])

    @torch.library.register_fake("lmforge::causal_attention_backward")
    def _(grad, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("lmforge::gelu")
    def _(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("lmforge::gelu_with_slope")
    def _(x):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    return True


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call). Under torch.compile
    this is a guarded read of `_available`: switching the kernels off recompiles."""
    return _load() if _available is None else _available


@torch.compiler.assume_constant_result  # tracing runs the build eagerly instead of tracing into it
def _load() -> bool:
    global _available
    if _available is None:
        _available = _build()
    return _available


def usable_for(x: torch.Tensor) -> bool:
    """Whether the training kernels (attention, GELU) may take x: float32 on the CPU, kernels built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and available()


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether x @ weight^T + bias is a decoding-size product the kernel should do: a few float32
    rows on the CPU, nothing to differentiate, a contiguous weight. Checked cheapest first, so
    that training and large batches never trigger a build. (It runs ~50 times per decoded token,
    hence plain conditions rather than a loop.)"""
    rows = MAX_INT8_ROWS if weight.dtype == torch.int8 else MAX_ROWS
    if x.numel() > rows * x.shape[-1] or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or getattr(bias, "requires_grad", False)):
        return False
    return weight.is_contiguous() and available()


def small_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T, times scales (N,) if given, plus bias (N,); weight fp32 or int8."""
    if x.dim() == 2:
        return torch.ops.lmforge.small_matmul.default(x, weight, scales, bias)
    out = torch.ops.lmforge.small_matmul.default(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
