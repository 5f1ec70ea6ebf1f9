"""Training plots from run folders' metrics.jsonl: one PNG per panel and one overview with all.

Several runs share each panel, one labelled line each, so runs can be compared at a glance. The
panels are the trainer's own records: training and validation loss, validation perplexity,
learning rate, tokens per second, gradient norm, plus any other validation figure a task run
logs (accuracy, F1, BLEU...).
"""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.insight import runinfo
from lmforge.insight.figures import pyplot, save_png

# panel name -> (title, [(split, key, line label)]); a panel no run has is left out
PANELS = {
    "loss": ("loss", [("train", "loss", "train"), ("val", "loss", "val")]),
    "perplexity": ("validation perplexity", [("val", "perplexity", "val")]),
    "lr": ("learning rate", [("train", "lr", "")]),
    "tokens_per_s": ("tokens per second", [("train", "tokens_per_s", "")]),
    "grad_norm": ("gradient norm", [("train", "grad_norm", "")]),
}
NOT_PLOTTED = {"step", "split", "tokens", "skipped_total", "elapsed_s", "examples"}


def read_records(run_dir) -> list[dict]:
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        raise LmforgeError(f"{run_dir} has no metrics.jsonl (is it a training run's folder?)")
    return runinfo.records(run_dir)


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one figure; a step logged twice (a resumed run) keeps its last value."""
    points = {r["step"]: r[key] for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))
              and not isinstance(r.get(key), bool) and math.isfinite(r[key])}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def run_labels(run_dirs: list) -> list[str]:
    """The folders' names, or their paths where names repeat."""
    names = [Path(d).name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def panels_for(runs: dict[str, list[dict]]) -> dict:
    panels = dict(PANELS)
    for records in runs.values():
        for record in records:
            if record.get("split") == "val":
                for key, value in record.items():
                    if key not in NOT_PLOTTED and key not in ("loss", "perplexity") and isinstance(value, float):
                        panels.setdefault(f"val_{key}", (f"validation {key}", [("val", key, "val")]))
    return {name: panel for name, panel in panels.items()
            if any(series(records, split, key)[0] for records in runs.values() for split, key, _ in panel[1])}


def _draw(ax, title: str, lines, runs: dict[str, list[dict]]) -> None:
    for label, records in runs.items():
        for split, key, what in lines:
            steps, values = series(records, split, key)
            if steps:
                name = " ".join(p for p in (label if len(runs) > 1 else "", what) if p) or key
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)


def plot_runs(run_dirs: list, out_dir) -> dict:
    """Write <panel>.png for every panel and overview.png with all of them; returns
    {"panels": [titles in order], "files": [paths]}."""
    if not run_dirs:
        raise LmforgeError("give at least one run folder")
    runs = dict(zip(run_labels(run_dirs), (read_records(d) for d in run_dirs), strict=True))
    panels = panels_for(runs)
    if not panels:
        raise LmforgeError("nothing to plot: metrics.jsonl has no records yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    files = []
    for name, (title, lines) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, title, lines, runs)
        fig.tight_layout()
        files.append(save_png(fig, out / f"{name}.png"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.values(), strict=False):
        _draw(ax, title, lines, runs)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    files.append(save_png(fig, out / "overview.png"))
    return {"panels": [title for title, _ in panels.values()], "files": files}
