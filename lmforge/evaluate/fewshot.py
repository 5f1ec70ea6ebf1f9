"""Zero- and few-shot prompting: using a language model for a task without changing its weights.

Each row fills a template's {placeholders}; K solved rows (drawn once, with a fixed seed, from
--shots-file) go before it, blank-line separated, each followed by its answer. A classification
is the label whose verbaliser word is most likely after the prompt (choice.py's log-likelihood,
the harness's way); a generation task decodes greedily up to the end of the line and is scored by
metrics.py like a fine-tuned model would be.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

SEPARATOR = "\n\n"
ANSWER_COLUMNS = ("target", "answer", "answers", "summary", "label")


def read_template(text_or_file: str) -> str:
    """The template itself, or the contents of the file it names."""
    path = Path(text_or_file)
    if "{" not in text_or_file and len(text_or_file) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8").rstrip("\n")
    return text_or_file


def fields_of(template: str) -> list[str]:
    """The placeholder names of a template, in order ('{{' and '}}' are literal braces)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise LmforgeError(f"bad template {template!r}: {exc}") from None


def render(template: str, fields: dict, where: str) -> str:
    missing = [name for name in fields_of(template) if name not in fields]
    if missing:
        raise LmforgeError(f"{where}: the template's {{{missing[0]}}} is not a field of the row "
                           f"(fields: {', '.join(map(str, fields)) or 'none'})")
    return template.format_map({k: "" if v is None else v for k, v in fields.items()})


def parse_verbalizer(text: str) -> dict[str, str]:
    """'0=terrible,1=great' → {"0": "terrible", "1": "great"}."""
    pairs = {}
    for item in text.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise LmforgeError(f"--verbalizer: {item!r} is not LABEL=WORD (e.g. '0=terrible,1=great')")
        pairs[label.strip()] = word.strip()
    if len(pairs) < 2:
        raise LmforgeError("--verbalizer needs at least two labels")
    return pairs


def draw_shots(path, k: int, seed: int) -> list[dict]:
    """K rows of the file, the same K for every query and every run with this seed."""
    from lmforge.finetune.tabular import read_rows

    rows = read_rows(path)
    if len(rows) < k:
        raise LmforgeError(f"--shots {k}: {path} has only {len(rows)} row(s)")
    return [row.fields for row in random.Random(seed).sample(rows, k)]


def build_prompts(template: str, rows: list[dict], shots: list[dict], answer_of) -> list[str]:
    """Each row's prompt: the shots with their answers, then the row's own filled template."""
    solved = "".join(render(template, shot, "a shot") + " " + answer_of(shot) + SEPARATOR for shot in shots)
    return [solved + render(template, row, f"row {i + 1}") for i, row in enumerate(rows)]


def _answer_column(args, row: dict) -> str:
    column = getattr(args, "answer_column", None) or getattr(args, "label_column", None)
    column = column or next((c for c in ANSWER_COLUMNS if c in row), None)
    if column is None or column not in row:
        raise LmforgeError(f"no answer column (looked for {column or ', '.join(ANSWER_COLUMNS)}); "
                           "name it with --answer-column")
    return column


def fewshot_task(args, progress):
    """`eval --template ... [--shots K --shots-file F] [--verbalizer ...]` on a decoder folder."""
    from lmforge.finetune.tabular import read_rows
    from lmforge.model_folder import load_model

    if not args.template:
        raise LmforgeError("prompting needs --template FILE|TEXT (with {field} placeholders)")
    if args.shots < 0 or (args.shots and not args.shots_file):
        raise LmforgeError("--shots K needs K >= 0 and --shots-file FILE to draw them from")
    if not args.data:
        raise LmforgeError("prompting needs --data ROWS (TSV, CSV or JSONL)")
    template = read_template(args.template)
    rows = [row.fields for path in args.data for row in read_rows(path)][:args.limit]
    if not rows:
        raise LmforgeError("no rows to score")
    shots = draw_shots(args.shots_file, args.shots, args.seed) if args.shots else []
    model, tokenizer = load_model(args.model_dir)
    column = _answer_column(args, rows[0])
    if args.verbalizer or args.task == "classify":
        if not args.verbalizer:
            raise LmforgeError("few-shot classification needs --verbalizer 'LABEL=WORD,...'")
        return _classify(model, tokenizer, template, rows, shots, parse_verbalizer(args.verbalizer), column, args,
                         progress)
    return _generate(model, tokenizer, template, rows, shots, column, args, progress)


def _classify(model, tokenizer, template, rows, shots, words, column, args, progress):
    from lmforge.evaluate.choice import loglikelihoods
    from lmforge.evaluate.metrics import accuracy, macro_f1
    from lmforge.evaluate.tasks import Scores

    labels = list(words)

    def label_of(row: dict) -> str:
        label = str(row.get(column))
        if label not in words:
            raise LmforgeError(f"label {label!r} has no word in --verbalizer (labels: {', '.join(labels)})")
        return label

    prompts = build_prompts(template, rows, shots, lambda shot: words[label_of(shot)])
    pairs = [(prompt, " " + words[label]) for prompt in prompts for label in labels]
    counted = (lambda n: progress(n / len(labels)))
    scores = np.array([s for s, _ in loglikelihoods(model, tokenizer, pairs, args.batch_size, counted)])
    predictions = scores.reshape(len(rows), len(labels)).argmax(1)  # ties: the first label
    references = np.array([labels.index(label_of(row)) for row in rows])
    recompute = {"accuracy": lambda p, r: accuracy(list(p), list(r)),
                 "macro_f1": lambda p, r: macro_f1(list(p), list(r), labels=range(len(labels)))}
    columns = (predictions, references)
    return Scores({k: f(*columns) for k, f in recompute.items()}, columns, recompute,
                  {"examples": len(rows), "shots": len(shots)})


def _generate(model, tokenizer, template, rows, shots, column, args, progress):
    """Greedy answers up to the end of the line, scored by the task's metrics."""
    from lmforge.evaluate import metrics
    from lmforge.evaluate.tasks import Scores
    from lmforge.generate import GenerationConfig, generate

    def references(row: dict) -> list[str]:
        value = row.get(column)
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    prompts = build_prompts(template, rows, shots, lambda shot: references(shot)[0])
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, stop=("\n",))
    outputs = []
    for start in range(0, len(prompts), args.batch_size):
        outputs += [text.strip() for text in generate(model, tokenizer, prompts[start:start + args.batch_size],
                                                      config)]
        progress(len(prompts[start:start + args.batch_size]))
    golds = [references(row) for row in rows]
    if args.task == "translate":
        recompute = {"bleu": lambda h, g: metrics.bleu(h, [x[0] for x in g])["score"],
                     "chrf": lambda h, g: metrics.chrf(h, [x[0] for x in g])["score"]}
    elif args.task == "summarize":
        recompute = {name: (lambda h, g, name=name: metrics.rouge(h, [x[0] for x in g])[name])
                     for name in metrics.ROUGE_TYPES}
    else:  # qa and free answers: SQuAD's exact match and F1 against every gold answer
        recompute = {name: (lambda h, g, name=name: metrics.squad_scores(h, g)[name]) for name in ("exact_match", "f1")}
    columns = (outputs, golds)
    return Scores({k: f(*columns) for k, f in recompute.items()}, columns, recompute,
                  {"examples": len(rows), "shots": len(shots)})
