"""What `lmforge search` leaves in OUT besides the trials' run folders: results.csv and
results.json (every trial that ran), history.png (each trial's value and the best so far), and
best (a link to the best trial's run folder, itself a model folder for generate, eval, predict)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.errors import LmforgeError

TRIALS_DIR = "trials"
BEST_LINK = "best"
HISTORY_SIZE = (8, 4.5)  # inches at 100 dpi: an 800 × 450 PNG


def trial_folder(number: int) -> Path:
    """A trial's run folder, relative to OUT."""
    return Path(TRIALS_DIR) / f"trial-{number}"


def trial_rows(study: optuna.Study, metric: str) -> list[dict]:
    """Every trial that ran, in order; a pruned trial's value is the last one it reported."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished() or trial.user_attrs.get("surplus"):
            continue  # waiting, running elsewhere, or closed untrained because the study was full
        value = trial.value
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        seconds = None
        if trial.datetime_start and trial.datetime_complete:
            seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 3)
        rows.append({"trial": trial.number, "state": trial.state.name, metric: value, "seconds": seconds,
                     "step": trial.user_attrs.get("step"), "params": dict(trial.params), "note": _note(trial)})
    return rows


def _note(trial) -> str:
    if trial.state == TrialState.PRUNED:
        return "pruned: the value is the last one reported"
    if trial.state != TrialState.FAIL:
        return ""
    return (trial.user_attrs.get("error") or trial.user_attrs.get("refused")
            or "stopped unfinished (killed or interrupted); its values ran again")


def write_results(study: optuna.Study, plan) -> dict:
    """Write results.json, results.csv, history.png and the best link; returns results.json's content."""
    metric, higher = plan.metric
    rows = trial_rows(study, metric)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if complete else None
    results = {
        "metric": metric, "direction": "maximize" if higher else "minimize", "trials_wanted": plan.wanted,
        "best": best and {"trial": best.number, metric: best.value, "params": dict(best.params),
                          "run_folder": str(trial_folder(best.number))},
        "best_folder": BEST_LINK if best and link_best(plan.out, best.number) else None,
        "trials": rows,
    }
    atomic_write_text(plan.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(plan.out / "results.csv", _table(rows, metric, list(plan.space)))
    plot_history(plan.out / "history.png", rows, metric, higher)
    return results


def _table(rows: list[dict], metric: str, names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", metric, "seconds", "step", *names, "note"])
    for row in rows:
        writer.writerow([row["trial"], row["state"], row[metric], row["seconds"], row["step"],
                         *(row["params"].get(name) for name in names), row["note"]])
    return buffer.getvalue()


def link_best(out: Path, number: int) -> bool:
    """OUT/best → trials/trial-N, relative (OUT can move), swapped in atomically. False when that
    folder is not here: the trial ran on another machine that keeps its folders locally."""
    target = trial_folder(number)
    if not (out / target / "config.json").is_file():
        return False
    tmp = out / f".{BEST_LINK}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    try:
        os.replace(tmp, out / BEST_LINK)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise LmforgeError(f"{out / BEST_LINK} is a folder, not the link search keeps there; move it away") from None
    return True


def plot_history(path: Path, rows: list[dict], metric: str, higher: bool) -> None:
    """Each trial's value (complete: dots; pruned: crosses at the last value reported) and the
    best complete value so far, as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=HISTORY_SIZE, dpi=100)
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot would pick: no display needed
    axes = figure.add_subplot()
    for state, marker, label in (("COMPLETE", "o", "complete"), ("PRUNED", "x", "pruned (last value reported)")):
        points = [(row["trial"], row[metric]) for row in rows if row["state"] == state and row[metric] is not None]
        if points:
            axes.scatter(*zip(*points, strict=True), marker=marker, label=label)
    complete = [(row["trial"], row[metric]) for row in rows if row["state"] == "COMPLETE"]
    if complete:
        numbers, values = zip(*complete, strict=True)
        axes.step(numbers, list(itertools.accumulate(values, max if higher else min)), where="post",
                  color="black", label="best so far")
    axes.set_xlabel("trial")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"validation {metric}")
    axes.set_title(f"optimisation history ({'higher' if higher else 'lower'} is better)")
    axes.grid(alpha=0.3)
    if rows:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
