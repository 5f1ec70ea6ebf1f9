"""Parallel text for translation and summarisation: pairs in, filtered and bucketed examples out.

Pairs come from two aligned files (line i of one is line i of the other) or from one TSV/JSONL
file with a source and a target column. A pair with an empty side is skipped and counted (the
Skipped report every task shares); files that do not line up are an error, because every pair
after the first missing line would be wrong. Pairs too long, or whose sides' lengths differ too
much (a sign of misalignment in web-crawled corpora), are dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.tabular import Skipped, pick_column, read_rows
from lmforge.tokenize import Tokenizer

SOURCE_COLUMNS = ("source", "src", "document", "article", "dialogue", "text")
TARGET_COLUMNS = ("target", "tgt", "summary", "highlights", "translation")
IGNORE = -100


@dataclass
class TextPair:
    line: int
    source: str
    target: str


@dataclass
class Example:
    """Token ids of one pair: the source as the encoder reads it, the target the decoder must
    produce (each ends with eos; the decoder's input is the target shifted right)."""

    input_ids: list[int]
    target_ids: list[int]
    index: int  # position among the pairs read, so decoded output can be matched to references


def _as_text(value, join: bool) -> str | None:
    """A cell's text; SciTLDR-style lists of sentences become one text (sources) or their first item."""
    if isinstance(value, list):
        items = [v for v in value if isinstance(v, str)]
        if not items:
            return None
        return " ".join(items) if join else items[0]
    return value if isinstance(value, str) else None


def read_pairs(source_file=None, target_file=None, data=None, source_column=None,
               target_column=None) -> tuple[list[TextPair], Skipped]:
    """Pairs from aligned files or from one TSV/CSV/JSONL file; rows with an empty side are skipped."""
    if (source_file is None) != (target_file is None):
        raise LmforgeError("--source-file and --target-file go together (two aligned files)")
    if source_file is not None and data is not None:
        raise LmforgeError("give either --source-file/--target-file or a TSV/JSONL file of pairs, not both")
    if source_file is None and data is None:
        raise LmforgeError("no parallel data: give --source-file and --target-file, or --data FILE.tsv|.jsonl")
    if source_file is not None:
        return _aligned_pairs(Path(source_file), Path(target_file))
    rows = read_rows(data)
    if not rows:
        raise LmforgeError(f"{data} has no rows")
    src = pick_column(rows, source_column, SOURCE_COLUMNS, "source", data)
    tgt = pick_column(rows, target_column, TARGET_COLUMNS, "target", data)
    if src is None or tgt is None:
        raise LmforgeError(f"{data} needs a source and a target column (e.g. source/target); it has "
                           f"{', '.join(sorted(rows[0].fields))}; name them with --source-column/--target-column")
    pairs, skipped = [], Skipped(str(data))
    for row in rows:
        pair = TextPair(row.line, _as_text(row.fields.get(src), True) or "", _as_text(row.fields.get(tgt), False) or "")
        if _keep(pair, skipped):
            pairs.append(pair)
    return pairs, skipped


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _aligned_pairs(source: Path, target: Path) -> tuple[list[TextPair], Skipped]:
    sources, targets = _lines(source), _lines(target)
    if len(sources) != len(targets):
        raise LmforgeError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: "
                           "aligned files need one line per pair")
    if not sources:
        raise LmforgeError(f"{source} is empty")
    pairs, skipped = [], Skipped(f"{source} + {target.name}")
    for number, (s, t) in enumerate(zip(sources, targets, strict=True), 1):
        pair = TextPair(number, s, t)
        if _keep(pair, skipped):
            pairs.append(pair)
    return pairs, skipped


def _keep(pair: TextPair, skipped: Skipped) -> bool:
    pair.source, pair.target = pair.source.strip(), pair.target.strip()
    if not pair.source:
        skipped.add("an empty source", pair.line)
    elif not pair.target:
        skipped.add("an empty target", pair.line)
    return bool(pair.source and pair.target)


# ---------------------------------------------------------------------------- tokenizers

class Sides:
    """How each side becomes ids: one joint BPE, or a separate one per side.

    A model has one token table. With separate vocabularies the source's ids are placed after
    the target's (offset by the target vocabulary's size), so the two never share a row and the
    decoder's outputs are target tokens; the source tokenizer travels inside task.json, the only
    file besides the model's own that every checkpoint and best/ copy carries."""

    def __init__(self, target: Tokenizer, source: Tokenizer | None = None):
        self.target, self.source = target, source
        self.offset = target.vocab_size if source is not None else 0
        if target.eos_id is None:
            raise LmforgeError("the tokenizer has no end-of-sequence token (<|endoftext|> or </s>)")
        self.eos_id = target.eos_id
        self.pad_id = target.pad_id if target.pad_id is not None else self.eos_id

    @classmethod
    def train(cls, pairs: list[TextPair], vocab_size: int, separate: bool) -> Sides:
        if separate:
            return cls(Tokenizer.train("bpe", (p.target for p in pairs), vocab_size=vocab_size),
                       Tokenizer.train("bpe", (p.source for p in pairs), vocab_size=vocab_size))
        texts = (text for p in pairs for text in (p.source, p.target))
        return cls(Tokenizer.train("bpe", texts, vocab_size=vocab_size))

    @property
    def vocab_size(self) -> int:
        return self.offset + (self.source or self.target).vocab_size

    def task_fields(self) -> dict:
        return {"source_tokenizer": self.source.to_json() if self.source is not None else None}

    @classmethod
    def from_task(cls, task: dict | None, tokenizer: Tokenizer) -> Sides:
        text = (task or {}).get("source_tokenizer")
        if not text:
            return cls(tokenizer)
        import tokenizers

        return cls(tokenizer, Tokenizer(tokenizers.Tokenizer.from_str(text)))

    @staticmethod
    def _frame(tokenizer: Tokenizer, ids: list[int], room: int | None = None) -> list[int]:
        """ids + eos, after bos when the tokenizer has one (BART's `<s> … </s>`; lmforge's BPE has none)."""
        start = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        room = None if room is None else room - len(start) - 1
        return start + ids[:room] + [tokenizer.eos_id]

    def encode_sources(self, texts: list[str], max_len: int) -> list[list[int]]:
        tokenizer = self.source or self.target
        return [[i + self.offset for i in self._frame(tokenizer, ids, max_len)]
                for ids in tokenizer.encode_batch(list(texts))]

    def encode_targets(self, texts: list[str]) -> list[list[int]]:
        return [self._frame(self.target, ids) for ids in self.target.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        """A target's text, on one line (output is one line per input); ids that are not target
        tokens (a source token the model emitted) are dropped."""
        limit = self.target.vocab_size
        return " ".join(self.target.decode([i for i in ids if i < limit]).splitlines()).strip()


# ---------------------------------------------------------------------------- examples

@dataclass
class Dropped:
    """Pairs left out for their length, by reason (filtering, not bad rows: no line numbers)."""

    total: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        parts = "; ".join(f"{n} {reason}" for reason, n in self.reasons.items())
        return f"dropped {self.count} of {self.total} pairs: {parts}"


def build_examples(pairs: list[TextPair], sides: Sides, max_source_len: int, max_target_len: int,
                   max_ratio: float | None = None, truncate_source: bool = False) -> tuple[list[Example], Dropped]:
    """Encode the pairs; drop (and count) those over the length limits or the length ratio.
    Summaries keep a long source's beginning instead (`truncate_source`): a news article or
    an abstract is routinely longer than the model's window, and its start is what matters."""
    limit = max_source_len if truncate_source else max_source_len + 1  # +1: see what is too long
    sources = sides.encode_sources([p.source for p in pairs], limit)
    targets = sides.encode_targets([p.target for p in pairs])
    examples, dropped = [], Dropped(len(pairs))
    for index, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        if len(src) > max_source_len:
            dropped.add(f"with a source over {max_source_len} tokens")
        elif len(tgt) > max_target_len:
            dropped.add(f"with a target over {max_target_len} tokens")
        elif max_ratio and max(len(src), len(tgt)) > max_ratio * min(len(src), len(tgt)):
            dropped.add(f"with a length ratio over {max_ratio:g}")
        else:
            examples.append(Example(src, tgt, index))
    return examples, dropped


def collate(examples: list[Example], pad_id: int, start_id: int) -> dict:
    """Teacher forcing: the decoder reads [start] + target[:-1] and predicts target; both sides
    are padded on the right (a causal decoder never looks at the padding after a row's end)."""
    batch = len(examples)
    src_width = max(len(e.input_ids) for e in examples)
    tgt_width = max(len(e.target_ids) for e in examples)
    ids = torch.full((batch, src_width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, src_width), dtype=torch.long)
    decoder = torch.full((batch, tgt_width), pad_id, dtype=torch.long)
    labels = torch.full((batch, tgt_width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n, m = len(example.input_ids), len(example.target_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :m] = torch.tensor(example.target_ids)
        decoder[row, :m] = torch.tensor([start_id, *example.target_ids[:-1]])
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder, "labels": labels}


def padding_fraction(batches: list[list[int]], examples: list[Example]) -> float:
    """Share of the source and target positions of these batches that are padding."""
    padded = real = 0
    for batch in batches:
        for lengths in ([len(examples[i].input_ids) for i in batch], [len(examples[i].target_ids) for i in batch]):
            padded += max(lengths) * len(lengths)
            real += sum(lengths)
    return 1.0 - real / padded if padded else 0.0


def write_jsonl_pairs(path, pairs: list[tuple[str, str]]) -> None:
    """A JSONL file of {"source", "target"} rows (tests and benchmarks build data with it)."""
    from lmforge.atomic import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
                                          for s, t in pairs))
