"""Resumable checkpoints, as atomic as the files in them (lmforge/atomic.py).

A training checkpoint is a whole folder `checkpoints/step-NNNNNNNN/` made under a
temporary name and renamed in one step; the run folder's top level always holds the newest
complete model (`model.safetensors`, `config.json`, `tokenizer.json`) for generate and eval.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from lmforge.atomic import UMASK, atomic_copy, atomic_write_bytes, fsync_dir
from lmforge.model_folder import model_files, save_model

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
BEST_DIR = "best"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its step-N name once complete)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2, weights=None,
    task: dict | None = None,
) -> Path:
    """Write checkpoints/step-N as a whole (temporary folder, then one rename), then point the run
    folder's top-level model files at it, then drop old checkpoints beyond `keep`."""
    import torch

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR

    def fill(folder: Path) -> None:
        save_model(model, folder, tokenizer, metadata={"step": step}, weights=weights, task=task, card=False)
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write_bytes(folder / TRAINER_STATE, buffer.getvalue())

    final = _write_whole(root / f"step-{step:08d}", fill)
    publish_model(final, run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        _remove_folder(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return final


def save_best(run_dir: str | Path, step: int, model, tokenizer, weights=None, task: dict | None = None) -> Path:
    """run_dir/best/: the best validated model so far (train/selection.py), replaced whole."""
    return _write_whole(Path(run_dir) / BEST_DIR,
                        lambda folder: save_model(model, folder, tokenizer, metadata={"step": step}, weights=weights,
                                                  task=task))


def publish_model(folder: Path, run_dir: str | Path) -> None:
    """Make `folder`'s model the run folder's top-level model, file by file, each atomically."""
    for name in model_files(folder):  # a plain model, or a LoRA run's adapter
        atomic_copy(folder / name, Path(run_dir) / name)
    from lmforge.insight.card import write_card

    write_card(run_dir)  # with the run's data, steps, time and metrics, which the run folder holds


def _write_whole(final: Path, fill) -> Path:
    """Fill a temporary sibling folder, then rename it to `final` (swapping an old one out first):
    `final` is never seen half-written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=_mkdir(final.parent)))
    tmp.chmod(0o777 & ~UMASK)
    fill(tmp)
    if final.exists():  # re-saving a step after a resume, or a better model: swap the old one out first
        _remove_folder(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def _remove_folder(folder: Path) -> None:
    """Rename out of the step-N namespace first, so a kill mid-delete never leaves a torn
    folder that still looks like a complete checkpoint."""
    trash = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
