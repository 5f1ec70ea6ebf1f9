"""Atomic files and resumable checkpoints.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed
over the old one, so a run killed at any instant leaves either the old or the new file, never a
torn one. A training checkpoint is a whole folder `checkpoints/step-NNNNNNNN/` made under a
temporary name and renamed in one step; the run folder's top level always holds the newest
complete model (`model.safetensors`, `config.json`, `tokenizer.json`) for generate and eval.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
_UMASK = os.umask(0)
os.umask(_UMASK)
TRAINER_STATE = "trainer_state.pt"


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes private files; these are ordinary ones
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Replace dst by src atomically: a hard link when possible (no bytes copied), else a copy."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def model_state(model, state: dict | None = None) -> dict:
    """State dict without aliases (a tied head is the token table), contiguous for safetensors."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("head.proj.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model, folder: str | Path, tokenizer=None, metadata: dict | None = None, weights=None) -> None:
    """Write a model folder that `load_model` (and `lmforge generate/eval`) accept.

    `weights` replaces model.state_dict() when the caller already gathered it (FSDP)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    atomic_write_bytes(folder / "model.safetensors", save(model_state(model, weights), metadata=meta))
    model.config.save(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")


def load_model(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model folder; any missing or broken file is a one-line error.

    A Hugging Face model folder (GPT-2, BERT, BART) is converted in memory, so every command that
    loads a model through here accepts one directly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmforge.config import ModelConfig
    from lmforge.errors import LmforgeError
    from lmforge.interop import from_hf, is_hf_folder
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


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its step-N name once complete)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2, weights=None
) -> Path:
    """Write checkpoints/step-N as a whole (temporary folder, then one rename), then point the run
    folder's top-level model files at it, then drop old checkpoints beyond `keep`."""
    import torch

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=_mkdir(root)))
    tmp.chmod(0o777 & ~_UMASK)
    save_model(model, tmp, tokenizer, metadata={"step": step}, weights=weights)
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    atomic_write_bytes(tmp / TRAINER_STATE, buffer.getvalue())
    if final.exists():  # re-saving a step after a resume: swap the old one out first
        _remove_folder(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for name in MODEL_FILES:
        atomic_copy(final / name, run_dir / name)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        _remove_folder(old)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
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
