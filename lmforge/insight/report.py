"""A run report: one self-contained HTML page (plots inlined as base64 PNGs, no scripts, no
external files) with the run's config, data, time, hardware, final metrics and a few samples."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import tempfile
from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.errors import LmforgeError
from lmforge.insight.runinfo import describe

STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:.6rem;white-space:pre-wrap}"""


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_shown(v))}</td></tr>"
                    for k, v in rows.items())
    return f"<table>{cells}</table>"


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def hardware() -> dict:
    import torch

    from lmforge.hardware import cpu_capability, cpu_has_native_bf16

    return {"machine": platform.machine(), "system": platform.platform(), "cpus": os.cpu_count(),
            "torch threads": torch.get_num_threads(), "vector ISA": cpu_capability(),
            "native bf16": cpu_has_native_bf16(), "python": platform.python_version(), "torch": torch.__version__}


def samples(run_dir: Path, prompts: list[str], max_new_tokens: int = 60) -> list[tuple[str, str]]:
    """(prompt, continuation) from the run's model, seeded; none for a model that does not generate."""
    from lmforge.generate import GenerationConfig, generate
    from lmforge.model_folder import load_model

    model, tokenizer = load_model(run_dir)
    if model.config.arch != "decoder" or model.config.n_labels:
        return []
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=0)
    return list(zip(prompts, generate(model, tokenizer, prompts, config), strict=True))


def default_prompts(info: dict) -> list[str]:
    """The first words of the training data's first file, or a newline."""
    for path in info["run"].get("data") or []:
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read(200).split()
        except (OSError, UnicodeDecodeError):
            continue
        if start:
            return [" ".join(start[:3])]
    return ["\n"]


def build_report(run_dir, prompts: list[str] | None = None) -> str:
    from lmforge.insight.plots import plot_runs

    run_dir = Path(run_dir)
    info = describe(run_dir)
    if not info["config"]:
        raise LmforgeError(f"{run_dir} is not a run folder (no config.json)")
    parts = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>"]
    summary = {"architecture": info["config"].get("arch"), "parameters": info["parameters"], "steps": info["steps"],
               "training time (s)": info["seconds"], "task": info["task"].get("task")}
    parts += ["<h2>Summary</h2>", _table(summary), "<h2>Final metrics</h2>",
              _table(info["final"]) if info["final"] else "<p>No metrics recorded.</p>"]
    if info["records"]:
        with tempfile.TemporaryDirectory() as scratch:
            plotted = plot_runs([run_dir], scratch)
            parts.append("<h2>Training curves</h2>")
            for path in plotted["files"]:
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(Path(path).stem)}</figcaption></figure>")
    run = info["run"]
    data = {"files": ", ".join(run.get("data") or []) or None, "validation files": ", ".join(run.get("val_data") or [])
            or None, "corpus (documents, what was skipped and why)": run.get("corpus"), "tokens": run.get("tokens"),
            "deduplicated": run.get("dedup"), "started from": run.get("init")}
    skipped = [r.get("skipped_total") for r in info["records"] if r.get("split") == "train"]
    if skipped:
        data["steps skipped (non-finite loss)"] = skipped[-1]
    parts += ["<h2>Data</h2>", _table(data), "<h2>Hardware</h2>", _table(hardware()),
              "<h2>Model config</h2>", _table(info["config"]), "<h2>Training config</h2>", _table(info["train_config"])]
    shown = samples(run_dir, prompts or default_prompts(info))
    if shown:
        parts.append("<h2>Samples</h2>")
        parts += [f"<pre><b>{html.escape(p)}</b>{html.escape(c)}</pre>" for p, c in shown]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lmforge run report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir, out=None, prompts: list[str] | None = None) -> Path:
    path = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(path, build_report(run_dir, prompts))
    return path
