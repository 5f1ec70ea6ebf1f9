"""What a run folder says about its run: steps, training time, final metrics, data, model size.

Read from the files the run wrote (metrics.jsonl, run.json, config.json, the weights' header), so
the report and the model card can describe any model folder without loading its model.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def records(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: the rest still counts
    return found


def training_seconds(found: list[dict]) -> float | None:
    """Each session's elapsed time adds up: a resumed session counts from zero again."""
    times = [r["elapsed_s"] for r in found if r.get("split") == "train" and isinstance(r.get("elapsed_s"), float)]
    if not times:
        return None
    total = sum(a for a, b in zip(times, times[1:], strict=False) if b < a)
    return total + times[-1]


def final_metrics(found: list[dict]) -> dict:
    """The last validation record's figures, and the last training loss."""
    result = {}
    train = [r for r in found if r.get("split") == "train" and isinstance(r.get("loss"), float)]
    if train:
        result["train loss"] = train[-1]["loss"]
    val = [r for r in found if r.get("split") == "val"]
    if val:
        result.update({f"val {k}": v for k, v in val[-1].items() if isinstance(v, float)})
    return result


def parameter_count(folder: Path) -> int | None:
    """Stored parameters (a tied head is stored, and counted, once), from the weights' header."""
    for name in ("model.safetensors", "adapter_model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            from safetensors import safe_open

            total = 0
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    size = 1
                    for dim in f.get_slice(key).get_shape():
                        size *= dim
                    total += size
            return total
    return None


def _vocab_size(tokenizer: dict, model: dict) -> int:
    """The highest token id plus one, over the vocabulary and the added (special) tokens."""
    vocab = model.get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t.get("id", 0) for t in tokenizer.get("added_tokens") or []]
    return max(ids) + 1 if ids else 0


def describe(folder) -> dict:
    """Everything the card and the report print about a model or run folder."""
    folder = Path(folder)
    found = records(folder)
    steps = [r["step"] for r in found if isinstance(r.get("step"), int)]
    tokenizer = read_json(folder / "tokenizer.json")
    model = tokenizer.get("model", {}) if isinstance(tokenizer.get("model"), dict) else {}
    return {
        "config": read_json(folder / "config.json"),
        "train_config": read_json(folder / "train_config.json"),
        "run": read_json(folder / "run.json"),
        "task": read_json(folder / "task.json"),
        "parameters": parameter_count(folder),
        "tokenizer": {"type": model.get("type"), "vocab_size": _vocab_size(tokenizer, model)} if tokenizer else None,
        "steps": max(steps) if steps else None,
        "seconds": training_seconds(found),
        "final": final_metrics(found),
        "records": found,
    }
