"""Sequence classification: labelled texts (or text pairs) → token ids → batches → accuracy, F1.

How a text becomes ids is the model folder's `template` (task.json):
- "tokenizer": the tokenizer's own post-processor, as transformers uses it (BERT's
  `[CLS] a [SEP] b [SEP]` with segment ids 0/1; GPT-2 adds nothing). Chosen when the tokenizer
  has such a template, and for Hugging Face classifiers used as they are.
- "lmforge": for tokenizers without one (lmforge's own): an encoder reads
  `<start> a <eos> [b <eos>]` (start: bos if the tokenizer has one, else eos), so [CLS]-pooling
  has a token of its own; a decoder reads `a <eos> [b <eos>]`, so its last token has seen all.
Inputs longer than the model's block are cut, the longer side of a pair first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.batches import pad_right
from lmforge.finetune.tabular import Row, Skipped, pick_column

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question")
PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
LABEL_COLUMNS = ("label", "labels")


@dataclass
class Example:
    input_ids: list[int]
    token_type_ids: list[int]
    label: int  # index into the task's labels; -1 when unknown (prediction)


def has_template(tokenizer) -> bool:
    processor = tokenizer.inner.post_processor
    return processor is not None and processor.num_special_tokens_to_add(False) > 0


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_len: int, arch: str,
           template: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, segment ids) for each text (and its pair), at most max_len tokens."""
    inner = tokenizer.inner
    firsts = inner.encode_batch_fast(texts, add_special_tokens=False)
    seconds = inner.encode_batch_fast(pairs, add_special_tokens=False) if pairs is not None else [None] * len(texts)
    out = []
    for a, b in zip(firsts, seconds, strict=True):
        if template == "tokenizer":
            n_special = inner.post_processor.num_special_tokens_to_add(b is not None) if inner.post_processor else 0
        else:
            n_special = (2 if arch == "encoder" else 1) + (b is not None)
        keep_a, keep_b = _fit(len(a.ids), None if b is None else len(b.ids), max_len - n_special)
        if template == "tokenizer":
            a.truncate(keep_a)
            if b is not None:
                b.truncate(keep_b)
            done = inner.post_processor.process(a, b, add_special_tokens=True) if inner.post_processor else a
            out.append((list(done.ids), list(done.type_ids)))
        else:
            out.append(lmforge_template(tokenizer, a.ids[:keep_a], None if b is None else b.ids[:keep_b], arch))
    return out


def _fit(len_a: int, len_b: int | None, budget: int) -> tuple[int, int | None]:
    """How many tokens of each side to keep: the longer side gives way first."""
    if budget < 2:
        raise LmforgeError(f"the model's block is too short for its special tokens (room for {budget} tokens)")
    if len_b is None:
        return min(len_a, budget), None
    while len_a + len_b > budget:
        if len_a >= len_b:
            len_a -= 1
        else:
            len_b -= 1
    return len_a, len_b


def lmforge_template(tokenizer, a: list[int], b: list[int] | None, arch: str) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_id
    if eos is None:
        raise LmforgeError("the tokenizer has no end-of-text token to separate and close the inputs")
    start = [tokenizer.bos_id if tokenizer.bos_id is not None else eos] if arch == "encoder" else []
    ids = start + a + [eos]
    types = [0] * len(ids)
    if b is not None:
        ids += b + [eos]
        types += [1] * (len(b) + 1)
    return ids, types


# ---------------------------------------------------------------- rows → examples


@dataclass
class Columns:
    text: str
    pair: str | None
    label: str | None


def find_columns(rows: list[Row], path, text=None, pair=None, label=None, need_label=True) -> Columns:
    """The text, optional pair and label columns: the ones named, else the common names."""
    columns = Columns(pick_column(rows, text, TEXT_COLUMNS, "text", path),
                      pick_column(rows, pair, PAIR_COLUMNS, "text pair", path),
                      pick_column(rows, label, LABEL_COLUMNS, "label", path))
    if columns.text is None:
        raise LmforgeError(f"{path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); name it with --text-column")
    if need_label and columns.label is None:
        raise LmforgeError(f"{path}: no label column (looked for {', '.join(LABEL_COLUMNS)}); "
                           "name it with --label-column")
    return columns


def label_key(value) -> str | None:
    """Labels compare as text, whole numbers however written ('1', 1, 1.0, '1.0' are one label);
    blank means missing."""
    if value is None:
        return None
    text = str(value).strip().lower() if isinstance(value, bool) else str(value).strip()
    if re.fullmatch(r"-?\d+(\.0*)?", text):
        text = str(int(float(text)))
    return text or None


def label_names(rows: list[Row], column: str) -> list[str]:
    """The task's labels, as the training data spells them: numbers in numeric order, else sorted."""
    names = {key for row in rows if (key := label_key(row.fields.get(column))) is not None}
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def build_examples(rows: list[Row], columns: Columns, labels: list[str], tokenizer, max_len: int, arch: str,
                   template: str, path) -> tuple[list[Example], Skipped]:
    """Examples for the rows that have a text and a known label; the others are counted by reason."""
    index = {name: i for i, name in enumerate(labels)}
    skipped, kept = Skipped(str(path)), []
    for row in rows:
        text = row.fields.get(columns.text)
        key = label_key(row.fields.get(columns.label)) if columns.label else None
        if not isinstance(text, str) or not text.strip():
            skipped.add("no text", row.line)
        elif columns.label and key is None:
            skipped.add("no label", row.line)
        elif columns.label and key not in index:
            skipped.add(f"a label the model does not know ({key!r})", row.line)
        else:
            kept.append((row, index[key] if columns.label else -1))
    pairs = [str(row.fields.get(columns.pair) or "") for row, _ in kept] if columns.pair else None
    encoded = encode(tokenizer, [row.fields[columns.text] for row, _ in kept], pairs, max_len, arch, template)
    examples = [Example(ids, types, label) for (ids, types), (_, label) in zip(encoded, kept, strict=True)]
    return examples, skipped


# ---------------------------------------------------------------- batches


def collate(examples: list[Example], pad_id: int, with_segments: bool) -> dict:
    """Right-padded tensors: a classifier pools by the attention mask, so padding sits anywhere."""
    ids, mask, segments = pad_right(examples, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}
    if with_segments:
        batch["token_type_ids"] = segments
    return batch


def augment(example: Example, generator: torch.Generator, how: str, prob: float, special_ids: set[int]) -> Example:
    """A noisier copy for training (EDA's random deletion and swap): each content token is
    dropped with probability `prob`, or round(prob x length) pairs of content tokens change
    places. Special tokens (start, separators) stay where they are; at least one content token stays."""
    content = [k for k, token in enumerate(example.input_ids) if token not in special_ids]
    ids, types = list(example.input_ids), list(example.token_type_ids)
    if how == "delete":
        drop = {k for k, r in zip(content, torch.rand(len(content), generator=generator).tolist(), strict=True)
                if r < prob}
        if len(drop) == len(content):
            drop.discard(content[0])
        keep = [k for k in range(len(ids)) if k not in drop]
        return Example([ids[k] for k in keep], [types[k] for k in keep], example.label)
    for _ in range(round(prob * len(content)) if len(content) > 1 else 0):
        a, b = torch.randint(len(content), (2,), generator=generator).tolist()
        ids[content[a]], ids[content[b]] = ids[content[b]], ids[content[a]]
    return Example(ids, types, example.label)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def class_probabilities(model, examples: list[Example], batch_size: int, pad_id: int) -> torch.Tensor:
    """(N, n_labels) softmax probabilities, in the examples' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with_segments = model.config.type_vocab_size > 0
    chunks = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id, with_segments)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        chunks.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.n_labels)


def score(model, examples: list[Example], batch_size: int, pad_id: int) -> dict:
    """Loss, accuracy and macro-F1 of the model on labelled examples."""
    from lmforge.evaluate.metrics import accuracy, macro_f1

    if not examples:
        raise LmforgeError("no labelled examples to score")
    probabilities = class_probabilities(model, examples, batch_size, pad_id)
    references = [e.label for e in examples]
    predictions = probabilities.argmax(-1).tolist()
    picked = probabilities[torch.arange(len(examples)), torch.tensor(references)]
    loss = float(-picked.clamp(min=1e-12).log().mean())
    return {"loss": loss, "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
            "examples": len(examples)}
