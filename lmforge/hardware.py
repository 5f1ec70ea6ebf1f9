"""What this processor can do, asked in one place so every CPU-dependent choice can be overridden.

Machines differ: some CPUs have only AVX2 (bf16 is emulated there, hundreds of times slower
than fp32), others AVX-512 with BF16 or AMX (a bf16 matrix product ~4x faster than fp32). The
choices that follow from it (bf16 autocast by default, which CPU kernels to build) read these
functions, and each answer can be forced with an environment variable, so that both branches
can run on any machine (the test suite does exactly that):

- LMFORGE_CPU_BF16=1|0: pretend the CPU has (or lacks) native bf16 matrix units.
- LMFORGE_CPU_CAPABILITY=AVX2|AVX512|DEFAULT|...: pretend torch detected this vector ISA.
"""

from __future__ import annotations

import os

import torch

from lmforge.errors import LmforgeError

BF16_OVERRIDE = "LMFORGE_CPU_BF16"
CAPABILITY_OVERRIDE = "LMFORGE_CPU_CAPABILITY"


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value or value == "auto":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LmforgeError(f"{name} must be 1, 0 or auto; got {os.environ[name]!r}")


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matrix products run on real units (AVX-512 BF16 or AMX), not emulated."""
    forced = _flag(BF16_OVERRIDE)
    if forced is not None:
        return forced
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: a GPU that supports it, or a CPU with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_capability() -> str:
    """torch's name for the widest vector instructions it uses here ("AVX2", "AVX512", "DEFAULT",
    or an ARM/POWER name), unless LMFORGE_CPU_CAPABILITY says otherwise."""
    return os.environ.get(CAPABILITY_OVERRIDE, "").strip().upper() or torch.backends.cpu.get_cpu_capability()

