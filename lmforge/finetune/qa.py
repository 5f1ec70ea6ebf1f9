"""Extractive question answering (SQuAD): the answer is a span of the context.

A question and its context become one or more windows: `question + context piece`, joined by the
folder's template (classify.py's: the tokenizer's own, e.g. BERT's `[CLS] q [SEP] c [SEP]`, or
lmforge's). A context too long for one window is cut into pieces that overlap by `doc_stride`
tokens (the overlap, as transformers' `stride` means it), so every answer lies whole inside some
window. The model gives each token a start and an end logit; the answer is the context span with
the highest start + end logit over all the question's windows (end >= start, at most
`max_answer_tokens` tokens), cut out of the original text through the tokens' character offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.batches import pad_right
from lmforge.finetune.classify import lmforge_template
from lmforge.finetune.tabular import Skipped

MAX_QUESTION_TOKENS = 64  # longer questions are cut, as BERT's SQuAD recipe does
DOC_STRIDE = 128
MAX_ANSWER_TOKENS = 30


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]  # every reference answer (SQuAD's dev set has up to 6); scoring takes the best
    answer_start: int | None = None  # character offset of the first answer in the context (training)


@dataclass
class Window:
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]  # each token's characters in the context; None outside it
    question: int  # index of its Question in the list it was built from
    start: int = 0  # the answer's first and last token here; 0 and 0 (the first token) when it is not inside
    end: int = 0


def read_squad(path: str | Path, need_answers: bool = True) -> tuple[list[Question], Skipped]:
    """The questions of a SQuAD-format JSON file. For training (need_answers) a question whose
    first answer is missing or not found at its answer_start in the context is skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not SQuAD JSON ({exc})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise LmforgeError(f'{path} is not SQuAD JSON: expected {{"data": [{{"paragraphs": [...]}}]}}')
    questions, skipped = [], Skipped(str(path), unit="question")
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_items(article, "paragraphs")):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            for q, qa in enumerate(_items(paragraph, "qas")):
                qid = str(qa.get("id", f"{a}.{p}.{q}")) if isinstance(qa, dict) else f"{a}.{p}.{q}"
                found = _question(qa, context, qid, need_answers)
                if isinstance(found, str):
                    skipped.add(found, qid)
                else:
                    questions.append(found)
    return questions, skipped


def read_answerable(paths, limit: int | None = None) -> tuple[list[Question], list[str]]:
    """The questions of SQuAD files that have a reference answer (what evaluation can score; the
    first `limit` of them), and one note per file for what was left out."""
    questions, notes = [], []
    for path in paths:
        found, skipped = read_squad(path, need_answers=False)
        answerable = [q for q in found if q.answers]
        questions += answerable
        if len(found) > len(answerable):
            notes.append(f"{path}: skipped {len(found) - len(answerable)} question(s) with no answer")
        if skipped.count:
            notes.append(skipped.summary())
    questions = questions[:limit]
    if not questions:
        raise LmforgeError("; ".join(notes) or "no questions to score")
    return questions, notes


def _items(parent, key: str) -> list:
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, list) else []


def _question(qa, context, qid: str, need_answers: bool) -> Question | str:
    """A Question, or the reason it cannot be used."""
    if not isinstance(context, str) or not context.strip():
        return "no context"
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        return "no question"
    answers = [a for a in qa.get("answers") or [] if isinstance(a, dict) and isinstance(a.get("text"), str)]
    texts = [a["text"] for a in answers]
    start = answers[0].get("answer_start") if answers and texts[0].strip() else None
    if not isinstance(start, int) or context[start:start + len(texts[0])] != texts[0]:
        start = None
    if need_answers and start is None:
        return "an answer not inside its context" if answers and texts[0].strip() else "no answer"
    return Question(qid, qa["question"], context, texts, start)


def make_question(question: str, context: str) -> Question:
    """One question asked on the command line or by a program."""
    if not question.strip() or not context.strip():
        raise LmforgeError("a question and a context are both needed")
    return Question("0", question, context, [])


# ---------------------------------------------------------------- questions → windows


def build_windows(questions: list[Question], tokenizer, max_len: int, arch: str, template: str,
                  doc_stride: int = DOC_STRIDE, with_labels: bool = True) -> list[Window]:
    """Every question's windows, in order; `Window.question` indexes `questions`."""
    if doc_stride < 0:
        raise LmforgeError(f"--doc-stride must be >= 0; got {doc_stride}")
    inner = tokenizer.inner
    asked = inner.encode_batch_fast([q.question for q in questions], add_special_tokens=False)
    contexts = inner.encode_batch(_unique_contexts(questions), add_special_tokens=False)  # offsets need encode_batch
    by_context = dict(zip(_unique_contexts(questions), contexts, strict=True))
    processor = inner.post_processor if template == "tokenizer" else None
    n_special = processor.num_special_tokens_to_add(True) if processor else (3 if arch == "encoder" else 2)
    windows = []
    for index, (q, question_tokens) in enumerate(zip(questions, asked, strict=True)):
        question_tokens.truncate(MAX_QUESTION_TOKENS)
        room = max_len - len(question_tokens.ids) - n_special
        if room <= doc_stride:
            raise LmforgeError(f"windows of {max_len} tokens leave {room} for the context, not more than "
                               f"--doc-stride {doc_stride}; lower --doc-stride")
        context = _copy(by_context[q.context])
        context.truncate(room, stride=doc_stride)
        for piece in [context, *context.overflowing]:
            window = _join(question_tokens, piece, processor, tokenizer, arch, index)
            if with_labels and q.answer_start is not None:
                window.start, window.end = _answer_tokens(window.offsets, q.answer_start,
                                                          q.answer_start + len(q.answers[0]))
            windows.append(window)
    return windows


def _unique_contexts(questions: list[Question]) -> list[str]:
    return list(dict.fromkeys(q.context for q in questions))  # SQuAD asks ~5 questions per paragraph


def _copy(encoding):
    """Truncation changes an Encoding in place; a paragraph shared by questions is cut afresh each time."""
    from tokenizers import Encoding

    return Encoding.merge([encoding])


def _join(question, piece, processor, tokenizer, arch: str, index: int) -> Window:
    if processor is not None:
        joined = processor.process(question, piece, add_special_tokens=True)
        offsets = [span if sequence == 1 else None for span, sequence in zip(joined.offsets, joined.sequence_ids,
                                                                             strict=True)]
        return Window(list(joined.ids), list(joined.type_ids), offsets, index)
    ids, types = lmforge_template(tokenizer, question.ids, piece.ids, arch)
    before = len(ids) - len(piece.ids) - 1  # the context sits just before the closing separator
    offsets = [None] * before + list(piece.offsets) + [None]
    return Window(ids, types, offsets, index)


def _answer_tokens(offsets: list, char_start: int, char_end: int) -> tuple[int, int]:
    """The first and last token covering the answer's characters, or (0, 0) when the answer is not
    wholly inside this window (the first token then stands for "no answer here")."""
    inside = [k for k, span in enumerate(offsets) if span is not None]
    if not inside or offsets[inside[0]][0] > char_start or offsets[inside[-1]][1] < char_end:
        return 0, 0
    first = max(k for k in inside if offsets[k][0] <= char_start)
    last = min(k for k in inside if offsets[k][1] >= char_end)
    return first, max(first, last)


# ---------------------------------------------------------------- batches


def collate(windows: list[Window], pad_id: int, with_segments: bool) -> dict:
    """Right-padded tensors with the answer's token positions as the targets."""
    ids, mask, segments = pad_right(windows, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask,
             "start_positions": torch.tensor([w.start for w in windows]),
             "end_positions": torch.tensor([w.end for w in windows])}
    if with_segments:
        batch["token_type_ids"] = segments
    return batch


# ---------------------------------------------------------------- logits → answers


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: list,
              max_answer_tokens: int) -> tuple[float, int, int] | None:
    """(start + end logit, first token, last token) of the best context span of one window."""
    context = torch.tensor([span is not None for span in offsets] + [False] * (len(start_logits) - len(offsets)))
    if not context.any():
        return None
    n = len(start_logits)
    scores = start_logits.float()[:, None] + end_logits.float()[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool).triu().tril(max_answer_tokens - 1)
    allowed &= context[:, None] & context[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    flat = int(scores.argmax())
    return float(scores.view(-1)[flat]), flat // n, flat % n


@torch.no_grad()
def answer(model, questions: list[Question], windows: list[Window], batch_size: int, pad_id: int,
           max_answer_tokens: int = MAX_ANSWER_TOKENS) -> tuple[list[dict], float]:
    """Each question's best answer {id, answer, start, end (characters), score} and the windows'
    mean loss (nan without labels). The score is the span's probability within its window
    (start probability x end probability over the window's context tokens)."""
    if max_answer_tokens < 1:
        raise LmforgeError(f"--max-answer-tokens must be at least 1; got {max_answer_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with_segments = model.config.type_vocab_size > 0
    best: dict[int, tuple] = {}
    losses = []
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id, with_segments).items()}
        output = model(**batch)
        losses.append(float(output.loss) * len(chunk))
        for window, logits in zip(chunk, output.logits.float().cpu(), strict=True):
            span = best_span(logits[:, 0], logits[:, 1], window.offsets, max_answer_tokens)
            if span is not None and (window.question not in best or span[0] > best[window.question][0]):
                best[window.question] = (*span, window, logits)
    model.train(was_training)
    results = [_answer_of(q, best.get(i)) for i, q in enumerate(questions)]
    return results, sum(losses) / max(len(windows), 1)


def _answer_of(question: Question, found) -> dict:
    if found is None:
        return {"id": question.id, "answer": "", "start": 0, "end": 0, "score": 0.0}
    _, first, last, window, logits = found
    start, end = window.offsets[first][0], window.offsets[last][1]
    text = question.context[start:end]
    start += len(text) - len(text.lstrip())  # byte-level BPE counts a word's leading space as its own
    context = torch.tensor([span is not None for span in window.offsets])
    start_p = torch.softmax(logits[: len(context), 0].masked_fill(~context, float("-inf")), 0)[first]
    end_p = torch.softmax(logits[: len(context), 1].masked_fill(~context, float("-inf")), 0)[last]
    return {"id": question.id, "answer": question.context[start:end].rstrip(), "start": start,
            "end": start + len(question.context[start:end].rstrip()), "score": float(start_p * end_p)}


def score(model, questions: list[Question], windows: list[Window], batch_size: int, pad_id: int,
          max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict:
    """SQuAD's exact match and F1 (0..100) over the questions, and the windows' span loss."""
    from lmforge.evaluate.metrics import squad_scores

    if not questions:
        raise LmforgeError("no questions to score")
    results, loss = answer(model, questions, windows, batch_size, pad_id, max_answer_tokens)
    scores = squad_scores([r["answer"] for r in results], [q.answers or [""] for q in questions])
    return {"loss": loss, **scores, "questions": len(questions)}
