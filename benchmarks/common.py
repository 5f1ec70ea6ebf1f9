"""What every benchmark shares: the machine's description, min/median/max summaries, the measured
matrix-product peak (the roofline a training step is held to), and writing results into the README.

A benchmark prints JSON and, with --readme, also saves it under benchmarks/results/ and replaces
its own table in README.md (between `<!-- bench:NAME -->` markers), so the published figures are
always the output of the command written next to them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    import transformers

    from lmforge.hardware import cpu_has_native_bf16

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def machine_line(info: dict) -> str:
    """One sentence for the README: where the table's figures come from."""
    bf16 = {True: ", with bf16 units", False: ", no bf16 units: bf16 emulated"}.get(info.get("native_bf16"), "")
    return (f"{info['cores']} cores of {info['cpu']} ({info['cpu_capability']}{bf16}), torch {info['torch']} with "
            f"{info['torch_threads']} threads, transformers {info['transformers']}, Python {info['python']}")


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """fp32 GFLOP/s of a square matrix product, best of `repeats`: the machine's practical peak,
    measured in the same run as the figures it is compared with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a result: the script's arguments without the output-only ones
    (--readme, --markdown, --json-out and its path)."""
    shown, skip = [], False
    for arg in argv:
        if not skip and arg not in ("--readme", "--markdown", "--json-out") and not arg.startswith("--json-out="):
            shown.append(arg)
        skip = arg == "--json-out"
    return " ".join(["python", f"benchmarks/{script}", *shown])


def publish(name: str, result: dict, table: str) -> None:
    """Save the JSON under benchmarks/results/NAME.json and put `table` into README.md between
    `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; the markers must already be there."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {start} ... {end} section to fill")
    body = f"{start}\n{table.strip()}\n\n*Measured with `{result['command']}` on {machine_line(result['machine'])}; " \
           f"full output: `benchmarks/results/{name}.json`.*\n{end}"
    README.write_text(pattern.sub(lambda _: body, text), encoding="utf-8")


def report(name: str, result: dict, table: str, json_out: str | None, readme: bool) -> None:
    """What every benchmark ends with: the JSON and the table printed, the JSON saved if asked,
    and with --readme both published (benchmarks/results/NAME.json and the README's table)."""
    text = json.dumps(result, indent=2)
    print(text)
    print("\n" + table)
    if json_out:
        Path(json_out).write_text(text + "\n")
    if readme:
        publish(name, result, table)
