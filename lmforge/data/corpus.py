"""Turn files, folders and glob patterns into clean text documents, one per file.

Anything that is not usable text (binary files, files that are not UTF-8) is skipped and
counted rather than fatal, so pointing lmforge at a messy folder works; only a corpus with
nothing usable at all is an error.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import sysconfig
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

BINARY_SNIFF_BYTES = 8192
_GLOB_CHARS = ("*", "?", "[")
_BOM = b"\xef\xbb\xbf"

# Line breaks of every convention become "\n": CRLF, lone CR, NEL and the Unicode line and
# paragraph separators (which str.splitlines() would treat as breaks anyway).
_LINE_BREAKS = re.compile("\r\n?|[\x85\u2028\u2029]")
# C0 and C1 control characters except tab and newline (NEL is handled above), plus stray
# byte-order marks (U+FEFF): all invisible, none carries meaning in running text.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff]")

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


@dataclass
class CorpusStats:
    """What load_corpus read and what it left out, for one summary line in the log."""

    files: int = 0
    documents: int = 0
    skipped_binary: int = 0
    skipped_undecodable: int = 0
    duplicates_removed: int = 0
    chars: int = 0  # of the kept, cleaned documents
    bytes: int = 0  # UTF-8 size of the kept, cleaned documents
    skipped_empty: int = 0

    def summary(self) -> str:
        parts = [f"{self.files} files", f"{self.documents} documents"]
        for count, what in (
            (self.skipped_binary, "binary skipped"),
            (self.skipped_undecodable, "not UTF-8 skipped"),
            (self.skipped_empty, "empty skipped"),
            (self.duplicates_removed, "duplicates removed"),
        ):
            if count:
                parts.append(f"{count} {what}")
        parts.append(f"{self.chars:,} characters ({_human_bytes(self.bytes)})")
        return ", ".join(parts)


def _human_bytes(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _is_regular_file(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _walk_folder(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted, skipping hidden files and folders (.git, .venv...)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(p for f in files if not f.startswith(".") and _is_regular_file(p := Path(root, f)))
    return sorted(found)


def resolve_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders and glob patterns into a list of files, in order, without repeats."""
    result: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        path = Path(entry)
        if path.exists():
            files = _walk_folder(path) if path.is_dir() else [path]
            if path.is_dir() and not files:
                raise LmforgeError(f"no files in folder: {path} (hidden files are skipped)")
        elif any(c in str(entry) for c in _GLOB_CHARS):
            files = []
            for match in sorted(glob.glob(str(entry), recursive=True)):
                files.extend(_walk_folder(Path(match)) if os.path.isdir(match) else [Path(match)])
            files = [f for f in files if _is_regular_file(f)]
            if not files:
                raise LmforgeError(f"pattern matched no files: {entry}")
        else:
            raise LmforgeError(f"no such file or folder: {entry}")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                result.append(f)
    return result


def clean_text(text: str) -> str:
    """NFC-normalise, unify line breaks to "\\n" and drop invisible control characters, so the
    same visible text always becomes the same tokens."""
    text = _CONTROLS.sub("", _LINE_BREAKS.sub("\n", text))
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def _describe(paths: Sequence[str | Path]) -> str:
    names = [str(p) for p in paths]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"


def load_corpus(paths: Sequence[str | Path], dedup: bool = False) -> tuple[list[str], CorpusStats]:
    """Read every file as one cleaned document; see the module docstring for what is skipped."""
    files = resolve_paths(paths)
    stats = CorpusStats(files=len(files))
    documents: list[str] = []
    seen: set[str] = set()
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LmforgeError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if b"\0" in raw[:BINARY_SNIFF_BYTES]:
            stats.skipped_binary += 1
            continue
        try:
            text = raw[len(_BOM):].decode("utf-8") if raw.startswith(_BOM) else raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_undecodable += 1
            continue
        text = clean_text(text)
        if not text.strip():  # nothing a model could learn from
            stats.skipped_empty += 1
            continue
        if dedup:
            if text in seen:
                stats.duplicates_removed += 1
                continue
            seen.add(text)
        documents.append(text)
        stats.chars += len(text)
        stats.bytes += len(text.encode("utf-8"))
    stats.documents = len(documents)
    if not documents:
        skipped = [
            f"{n} {what}"
            for n, what in (
                (stats.skipped_binary, "binary"),
                (stats.skipped_undecodable, "undecodable"),
                (stats.skipped_empty, "empty"),
            )
            if n
        ]
        counts = " and ".join([", ".join(skipped[:-1]), skipped[-1]] if len(skipped) > 1 else skipped)
        raise LmforgeError(f"no usable text in {_describe(paths)}: {counts} file(s) skipped")
    return documents, stats


def stdlib_source_files() -> list[Path]:
    """The demo corpus: the standard library's own Python sources (no tests, no third-party code),
    so the demo needs no download and no data folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        found.extend(
            Path(folder, f) for f in files
            if f.endswith(".py") and not f.startswith("test_") and _is_regular_file(Path(folder, f))
        )
    if not found:
        raise LmforgeError(f"no Python standard library sources found under {root}")
    return sorted(found)
