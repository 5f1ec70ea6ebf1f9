"""Model folders: what every stage after training reads, in lmforge's format or Hugging Face's.

An lmforge model folder is `model.safetensors`, `config.json` and `tokenizer.json`, written
atomically, and `task.json` when it was fine-tuned for a task. A Hugging Face folder (GPT-2,
BERT, BART) is converted in memory as it loads, so every command that loads a model through
`load_model` accepts one directly. This module sits below train/ (which writes model folders
into its checkpoints) and above model/ and interop/.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.errors import LmforgeError
from lmforge.interop import from_hf, hf_task, is_hf_folder, to_hf

MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")
TASK_FILE = "task.json"  # only in fine-tuned folders


def model_state(model, state: dict | None = None) -> dict:
    """State dict without aliases (a tied head is the token table), contiguous for safetensors."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("head.proj.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model, folder: str | Path, tokenizer=None, metadata: dict | None = None, weights=None,
               task: dict | None = None) -> None:
    """Write a model folder that `load_model` (and `lmforge generate/eval`) accept.

    `weights` replaces model.state_dict() when the caller already gathered it (FSDP); `task` is
    what a fine-tuned model is for (task.json, read back by `read_task`)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    atomic_write_bytes(folder / "model.safetensors", save(model_state(model, weights), metadata=meta))
    model.config.save(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
    if task is not None:
        atomic_write_text(folder / TASK_FILE, json.dumps(task, indent=2, ensure_ascii=False) + "\n")


def read_task(folder: str | Path) -> dict | None:
    """What a model folder was fine-tuned for ({"task": "classify", "labels": [...], ...}), or None
    for a plain language model. A Hugging Face folder says it through its architecture and labels."""
    folder = Path(folder)
    if is_hf_folder(folder):
        return hf_task(folder)
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmforgeError(f"cannot parse {path}: {exc}") from None
    if not isinstance(task, dict) or "task" not in task:
        raise LmforgeError(f"{path} must be a JSON object with a \"task\" field")
    return task


def load_model(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model folder; any missing or broken file is a one-line error.

    A Hugging Face model folder (GPT-2, BERT, BART) is converted in memory, so every command that
    loads a model through here accepts one directly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmforge.config import ModelConfig
    from lmforge.model import build_model
    from lmforge.tokenize import Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"model folder not found: {folder}")
    if is_hf_folder(folder):
        model, tokenizer = from_hf(folder)
        return model.to(device).eval(), tokenizer
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise LmforgeError(f"{folder} is not a model folder: {name} is missing")
    config = ModelConfig.load(folder / "config.json")
    model = build_model(config)
    try:
        state = load_file(folder / "model.safetensors", device=device)
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"cannot read {folder / 'model.safetensors'}: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "head.proj.weight")]
    if missing or unexpected:
        raise LmforgeError(
            f"{folder / 'model.safetensors'} does not match config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    return model.to(device).eval(), Tokenizer.load(folder / "tokenizer.json")


def _fresh_output(out_dir: str | Path, source: Path) -> Path:
    """Converting never mixes files into an existing folder (a stale pytorch_model.bin would win)."""
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise LmforgeError(f"--out must differ from the folder being converted ({source})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"--out {out} already exists and is not an empty folder")
    return out


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path):
    """An lmforge model folder from a Hugging Face one; returns the model."""
    out = _fresh_output(out_dir, Path(hf_dir))
    if not is_hf_folder(hf_dir):
        raise LmforgeError(f"{hf_dir} is not a Hugging Face model folder (no config.json with a model_type)")
    model, tokenizer = from_hf(hf_dir)
    save_model(model, out, tokenizer, task=hf_task(hf_dir))  # a classifier keeps its label names
    return model


def convert_to_hf(model_dir: str | Path, out_dir: str | Path):
    """A Hugging Face folder from an lmforge model folder; returns the model."""
    out = _fresh_output(out_dir, Path(model_dir))
    model, tokenizer = load_model(model_dir)
    to_hf(model, tokenizer, out, task=read_task(model_dir))
    return model
