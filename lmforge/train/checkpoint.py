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
TRAINER_STATE = "trainer_state.pt"


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
