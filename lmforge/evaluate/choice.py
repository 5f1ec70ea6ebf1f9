"""Multiple choice by log-likelihood, and the scoring of (context, continuation) pairs it rests on.

A choice's score is the summed log-probability of its tokens after the context, as
lm-evaluation-harness computes it: the context and the continuation are tokenized together and
the continuation's tokens are those past the context's own tokens (a trailing space of the
context moves to the continuation, so " great" is one token in both). The harness's lmforge model
(harness.py), few-shot classification (fewshot.py) and `eval --task choice` all score through
`loglikelihoods`, so their numbers agree by construction; the ranking (raw and per character)
is metrics.choice_accuracy's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

DELIMITER = " "  # between the context and each choice: the harness's default target_delimiter


@dataclass
class ChoiceExample:
    context: str
    choices: list[str]
    label: int


def read_choices(path, limit: int | None = None) -> list[ChoiceExample]:
    """Examples from a JSONL file of {"context": str, "choices": [str, ...], "label": int}."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"file not found: {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(examples) >= limit:
            break
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise LmforgeError(f"{path}, line {number}: not JSON ({exc})") from None
        row = row if isinstance(row, dict) else {}
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        if not isinstance(context, str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) for c in choices):
            raise LmforgeError(f"{path}, line {number}: needs a string context and a non-empty list of string choices")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise LmforgeError(f"{path}, line {number}: label must be an index into its {len(choices)} choices, "
                               f"got {label!r}")
        examples.append(ChoiceExample(context, choices, label))
    if not examples:
        raise LmforgeError(f"{path} has no examples")
    return examples


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them: tokenized as one text."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if not context_ids:  # nothing to condition on: the end-of-text token starts the text
        start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if start is None:
            raise LmforgeError("an empty context needs a tokenizer with an end-of-text or start token")
        return [start], whole
    return context_ids, whole[len(context_ids):]


def require_language_model(model) -> None:
    """Log-likelihoods need a decoder with its next-token head (not a classifier's or a span head)."""
    if model.config.arch != "decoder":
        raise LmforgeError(f"log-likelihood scoring needs a decoder; this model is a {model.config.arch}")
    if model.config.n_labels or model.config.span_head:
        raise LmforgeError("log-likelihood scoring needs a language model; this folder is fine-tuned for a task "
                           "(its head predicts labels or answer spans, not tokens)")


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   progress=None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether it is the greedy continuation) for each pair.

    Pairs that share a context (the choices of one question) read it once: the context runs
    first, its keys and values are cached and copied to each continuation (shared_context), which
    is most of the work saved when contexts are long. Pairs that must be cut to fit the window
    are scored whole, row by row (score_rows)."""
    window = model.config.block_size
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    rows, row_of = [], []
    for index, (context, continuation) in enumerate(pairs):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise LmforgeError(f"the continuation {continuation!r} has no tokens")
        if len(context_ids) + len(continuation_ids) - 1 <= window:
            groups.setdefault(tuple(context_ids), []).append((index, continuation_ids))
        else:  # the harness keeps the end of what does not fit
            ids = (context_ids + continuation_ids)[-(window + 1):]
            rows.append((ids[:-1], ids[-len(continuation_ids):]))
            row_of.append(index)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for index, found in zip(row_of, score_rows(model, rows, batch_size, pad, progress), strict=True):
        results[index] = found
    for index, found in shared_context(model, groups, batch_size, pad, progress):
        results[index] = found
    return results


@torch.no_grad()
def shared_context(model, groups: dict, batch_size: int, pad: int, progress=None):
    """Yield (pair index, (log-likelihood, greedy)) for groups {context ids: [(index, continuation
    ids)]}: contexts left-padded in one batch, cached, the cache rows repeated per continuation,
    continuations right-padded after them; the head sees only the scored positions."""
    require_language_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(groups, key=len, reverse=True)
    start = 0
    while start < len(order):
        taken, rows = [], 0
        while start < len(order) and (not taken or rows + len(groups[order[start]]) <= batch_size):
            taken.append(order[start])
            rows += len(groups[order[start]])
            start += 1
        yield from _score_groups(model, [(list(c), groups[c]) for c in taken], pad, device)
        if progress is not None:
            progress(rows)
    model.train(was_training)


def _score_groups(model, taken: list, pad: int, device):
    width = len(taken[0][0])  # the longest context: taken in order of length
    longest = max(len(ids) for _, members in taken for _, ids in members)
    ctx = torch.full((len(taken), width), pad, dtype=torch.long)
    ctx_mask = torch.zeros((len(taken), width), dtype=torch.long)
    for g, (context, _) in enumerate(taken):
        ctx[g, width - len(context):], ctx_mask[g, width - len(context):] = torch.tensor(context), 1
    padded = not bool(ctx_mask.all())
    cache = model.new_cache(len(taken), width + longest - 1)
    last = model.decode(ctx.to(device), ctx_mask.to(device) if padded else None, cache=cache)[:, -1]
    owners = [g for g, (_, members) in enumerate(taken) for _ in members]
    members = [m for _, group in taken for m in group]
    rest = None
    if longest > 1:
        cache.reorder(torch.tensor(owners, device=device))
        inputs = torch.full((len(members), longest - 1), pad, dtype=torch.long)
        for r, (_, ids) in enumerate(members):
            inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        mask = None
        if padded:  # right padding of the continuations sits after every scored position: only keys of the context
            mask = torch.cat([ctx_mask[owners], torch.ones_like(inputs)], dim=1).to(device)
        rest = model.decode(inputs.to(device), mask, cache=cache)
    scored = [torch.cat([last[owner:owner + 1], rest[r, :len(ids) - 1]]) if len(ids) > 1 else last[owner:owner + 1]
              for r, (owner, (_, ids)) in enumerate(zip(owners, members, strict=True))]
    found = _summed(model, scored, [ids for _, ids in members])
    yield from zip([index for index, _ in members], found, strict=True)


def _summed(model, hidden: list[torch.Tensor], targets: list[list[int]]) -> list[tuple[float, bool]]:
    """Each piece's summed log-probability of its targets, and whether each target is the argmax:
    one pass of the head over all pieces (its weights are read once, not once per piece)."""
    logprobs = torch.log_softmax(model.head(torch.cat(hidden)).float(), dim=-1)
    wanted = torch.tensor([t for row in targets for t in row], device=logprobs.device)
    picked = logprobs.gather(-1, wanted[:, None])[:, 0]
    right = logprobs.argmax(-1) == wanted
    results, start = [], 0
    for row in targets:
        stop = start + len(row)
        results.append((float(picked[start:stop].sum()), bool(right[start:stop].all())))
        start = stop
    return results


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], list[int]]], batch_size: int, pad: int,
               progress=None, greedy: bool = True) -> list[tuple[float, bool]]:
    """For rows of (input ids, targets), the targets being the tokens after the last len(targets)
    positions: their summed log-probability, and whether each is the argmax.

    Rows are right-padded with no attention mask: padding sits after every scored position, so it
    changes nothing, and plain causal attention keeps its fused kernel. Only the scored positions
    go through the head, which is most of the cost at a large vocabulary. The longest rows go
    first, so a too-long batch fails at once, and similar lengths share a batch. Without `greedy`
    (the flag is then False) the head runs in chunks that never hold a row's logits
    (heads.vocabulary_loss): what rolling perplexity over long windows wants.
    """
    from lmforge.model.heads import vocabulary_loss

    require_language_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(rows[chunk[0]][0])
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        for r, index in enumerate(chunk):
            inputs[r, :len(rows[index][0])] = torch.tensor(rows[index][0])
        hidden = model.decode(inputs.to(device))
        scored = [hidden[r, len(rows[i][0]) - len(rows[i][1]):len(rows[i][0])] for r, i in enumerate(chunk)]
        if greedy:
            for index, found in zip(chunk, _summed(model, scored, [rows[i][1] for i in chunk]), strict=True):
                results[index] = found
        else:
            for index, row in zip(chunk, scored, strict=True):
                labels = torch.tensor(rows[index][1], device=device)[None]
                results[index] = (-float(vocabulary_loss(model.head, row[None], labels)) * labels.shape[1], False)
        if progress is not None:
            progress(len(chunk))
    model.train(was_training)
    return results


def choice_scores(model, tokenizer, examples: list[ChoiceExample], batch_size: int = 16, progress=None,
                  delimiter: str = DELIMITER) -> list[list[float]]:
    """Each example's log-likelihood of each choice after its context."""
    pairs = [(e.context, delimiter + c) for e in examples for c in e.choices]
    per_example = len(pairs) / len(examples)  # the bar counts examples, the batches count choices
    counted = (lambda n: progress(n / per_example)) if progress is not None else None
    flat = iter(loglikelihoods(model, tokenizer, pairs, batch_size, counted))
    return [[next(flat)[0] for _ in e.choices] for e in examples]


def character_lengths(examples: list[ChoiceExample]) -> list[list[float]]:
    """The length normaliser of acc_norm: each choice's length in characters (the harness's)."""
    return [[float(len(c)) for c in e.choices] for e in examples]
