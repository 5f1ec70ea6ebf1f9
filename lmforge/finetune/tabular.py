"""Labelled rows from TSV, CSV or JSONL files, each with the line it came from.

Tasks read their training and evaluation data through here, so every task reports a bad row the
same way: by file and line number, counted, and skipped (`Skipped`), while a file that cannot be
read at all is one clear error.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "lines"}
SHOWN_LINES = 5  # how many line numbers a skip report names


@dataclass
class Row:
    line: int  # 1-based line in the file (for CSV, the line where the row ends)
    fields: dict


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a .tsv/.csv (header line first), .jsonl (one object per line) or .txt (one
    text per line, as the field "text") file."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise LmforgeError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv, .jsonl or .txt")
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            if kind == "jsonl":
                return _jsonl_rows(handle, path)
            if kind == "lines":
                return [Row(n, {"text": line.rstrip("\r\n")}) for n, line in enumerate(handle, 1) if line.strip()]
            return _delimited_rows(handle, path, kind)
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_rows(handle, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise LmforgeError(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
        rows.append(Row(number, value))
    return rows


def _delimited_rows(handle, path: Path, kind: str) -> list[Row]:
    """GLUE's TSV files are unquoted (a quote is text); CSV follows the usual quoting rules."""
    csv.field_size_limit(sys.maxsize)
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
    reader = csv.DictReader(handle, **options)
    if not reader.fieldnames:
        raise LmforgeError(f"{path} is empty: a header line naming the columns is needed")
    rows = []
    for values in reader:
        values.pop(None, None)  # cells beyond the header
        rows.append(Row(reader.line_num, values))
    return rows


def pick_column(rows: list[Row], wanted: str | None, candidates: tuple[str, ...], what: str, path) -> str | None:
    """The column to read `what` from: the one asked for, else the first common name present.
    None when nothing fits and nothing was asked for (an optional column)."""
    present = set(rows[0].fields) if rows else set()
    if wanted:
        if rows and wanted not in present:
            raise LmforgeError(f"{path} has no column {wanted!r} for the {what}; it has {', '.join(sorted(present))}")
        return wanted
    return next((name for name in candidates if name in present), None)


@dataclass
class Skipped:
    """Rows left out of a file, by reason, with their line numbers (for one report line)."""

    path: str
    reasons: dict[str, list] = field(default_factory=dict)
    unit: str = "line"  # what identifies a row: a line number, or e.g. a SQuAD question's id

    def add(self, reason: str, line) -> None:
        self.reasons.setdefault(reason, []).append(line)

    @property
    def count(self) -> int:
        return sum(len(lines) for lines in self.reasons.values())

    def summary(self) -> str:
        parts = []
        for reason, lines in self.reasons.items():
            shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (", ..." if len(lines) > SHOWN_LINES else "")
            parts.append(f"{len(lines)} with {reason} ({self.unit}{'s' if len(lines) > 1 else ''} {shown})")
        rows = "question(s)" if self.unit == "question" else "row(s)"
        return f"{self.path}: skipped {self.count} {rows}: " + "; ".join(parts)
