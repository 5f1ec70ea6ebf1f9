"""`lmforge eval MODEL_DIR --task NAME`: a registry from task name to the function that scores it.

Every task returns the same shape (`Scores`): point estimates, plus the per-example columns each
metric can be recomputed from, so one function (`with_intervals`) gives every metric of every
task its bootstrap interval, and one printer shows them as a table or JSON. The metrics
themselves are metrics.py's; the models are run by the code that trained them (finetune/,
seq2seq.py) or by choice.py / fewshot.py.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.evaluate.bootstrap import metric_interval

TASK_NAMES = ("perplexity", "classify", "qa", "choice", "translate", "summarize")
SHOWN = {"bits_per_byte": "bits/byte", "macro_f1": "macro-F1", "exact_match": "exact match",
         "accuracy_norm": "accuracy (per char)"}  # table names; JSON keeps the keys


@dataclass
class Scores:
    """What a task measured. `recompute[name](*columns)` gives metric `name` on any resample of
    the examples (the rows of `columns`); a metric missing from it has no interval."""

    values: dict[str, float]
    columns: tuple = ()
    recompute: dict[str, Callable] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # examples, tokens, signatures: printed as they are
    notes: list[str] = field(default_factory=list)


TASKS: dict[str, Callable] = {}


def task(name: str):
    """Register `function(args, progress) -> Scores` as `eval --task name`."""
    def add(function):
        TASKS[name] = function
        return function
    return add


class Progress:
    """A tqdm bar on stderr counting examples, with their rate; silent when off."""

    def __init__(self, enabled: bool, unit: str = "ex"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def __call__(self, n: float) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_task(model_dir) -> str:
    """The folder's own task (task.json), else perplexity."""
    from lmforge.model_folder import read_task

    saved = read_task(model_dir)
    return saved["task"] if saved is not None else "perplexity"


def with_intervals(scores: Scores, resamples: int, seed: int) -> dict:
    """{"low", "high"} of each recomputable metric (bootstrap, `resamples` seeded resamples)."""
    intervals = {}
    for name, metric in scores.recompute.items():
        found = metric_interval(metric, *scores.columns, resamples=resamples, seed=seed)
        intervals[name] = [found["low"], found["high"]]
    return intervals


def evaluate(args) -> dict:
    """Run the task `args` asks for; the result dict printed by `eval` (--json prints it as is)."""
    name = args.task or default_task(args.model_dir)
    if getattr(args, "template", None) or getattr(args, "verbalizer", None) or getattr(args, "shots", 0):
        from lmforge.evaluate.fewshot import fewshot_task  # a plain LM prompted, not a task folder

        function = fewshot_task
        name = f"{args.task or ('classify' if args.verbalizer else 'qa')} (prompted)"
    elif name in TASKS:
        function = TASKS[name]
    else:
        raise LmforgeError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    if args.limit is not None and args.limit < 1:
        raise LmforgeError(f"--limit must be at least 1; got {args.limit}")
    if args.bootstrap < 0:
        raise LmforgeError(f"--bootstrap must be 0 (no intervals) or more; got {args.bootstrap}")
    progress = Progress(args.progress if args.progress is not None else sys.stderr.isatty())
    try:
        scores = function(args, progress)
    finally:
        progress.close()
    result = {"task": name, **scores.values, **scores.counts}
    if scores.notes:
        result["skipped"] = scores.notes
    if args.bootstrap:
        result["ci95"] = with_intervals(scores, args.bootstrap, args.seed)
        result["bootstrap"] = {"resamples": args.bootstrap, "seed": args.seed}
    if progress.bar is not None and progress.bar.format_dict["elapsed"] > 0:
        result["examples_per_second"] = progress.bar.format_dict["n"] / progress.bar.format_dict["elapsed"]
    return result


def format_table(result: dict, metrics: list[str]) -> str:
    """metric | value | 95% interval, one row per metric."""
    intervals = result.get("ci95", {})
    width = max(len(SHOWN.get(m, m)) for m in metrics)
    lines = [f"{'metric':<{width}}  {'value':>10}  95% CI" if intervals else f"{'metric':<{width}}  {'value':>10}"]
    for metric in metrics:
        line = f"{SHOWN.get(metric, metric):<{width}}  {result[metric]:>10.4f}"
        if metric in intervals:
            low, high = intervals[metric]
            line += f"  [{low:.4f}, {high:.4f}]"
        lines.append(line)
    return "\n".join(lines)


def eval_command(args) -> int:
    result = evaluate(args)
    for note in result.get("skipped", []):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    metrics = [k for k, v in result.items() if isinstance(v, float) and k != "examples_per_second"]
    print(format_table(result, metrics))
    counts = [f"{v:,} {k}" for k, v in result.items() if isinstance(v, int) and not isinstance(v, bool)]
    if counts:
        print(f"({', '.join(counts)})")
    for key, value in result.items():
        if key.endswith("_signature"):
            print(value)
    return 0


# ---------------------------------------------------------------------------- the tasks

def _mean(column) -> float:
    return float(np.mean(column))


@task("perplexity")
def perplexity_task(args, progress) -> Scores:
    """Loss, perplexity and bits per byte of text files; the bootstrap resamples windows, and
    holds bits per byte's bytes-per-token ratio at its whole-corpus value."""
    from lmforge.evaluate.perplexity import evaluate_corpus
    from lmforge.model_folder import load_model

    if not args.data:
        raise LmforgeError("--task perplexity needs --data TEXT_FILES")
    model, tokenizer = load_model(args.model_dir)
    if model.config.n_labels:
        raise LmforgeError(f"{args.model_dir} is a sequence classifier with no task.json: no label names to score")
    windows: list = []
    found = evaluate_corpus(model, tokenizer, args.data, batch_size=args.batch_size, max_batches=args.max_batches,
                            limit=args.limit, per_window=windows, progress=progress)
    sums, counts = (np.array(c, dtype=np.float64) for c in zip(*windows, strict=True))

    def loss(s, c):
        return float(np.sum(s) / max(np.sum(c), 1))

    recompute = {"loss": loss, "perplexity": lambda s, c: math.exp(min(loss(s, c), 700.0))}
    values = {"loss": found["loss"], "perplexity": found["perplexity"]}
    if "bits_per_byte" in found:
        ratio = found["bits_per_byte"] / found["loss"] if found["loss"] else 0.0
        values["bits_per_byte"] = found["bits_per_byte"]
        recompute["bits_per_byte"] = lambda s, c: loss(s, c) * ratio
    return Scores(values, (sums, counts), recompute, {"tokens": found["tokens"], "windows": len(windows)})


def _task_model(args, kind: str):
    from lmforge.finetune.predict import load_task_model

    model, tokenizer, saved = load_task_model(args.model_dir)
    if saved["task"] != kind:
        raise LmforgeError(f"{args.model_dir} is a {saved['task']} model, not a {kind} one")
    given = {key: getattr(args, key, None) for key in ("text_column", "text_pair_column", "label_column")}
    return model, tokenizer, {**saved, **{key: value for key, value in given.items() if value}}


@task("classify")
def classify_task(args, progress) -> Scores:
    """A fine-tuned classifier's accuracy and macro-F1 on labelled rows, and its loss."""
    from lmforge.evaluate.metrics import accuracy, macro_f1
    from lmforge.finetune import classify
    from lmforge.finetune.tabular import read_rows

    if not args.data:
        raise LmforgeError("--task classify needs --data LABELLED_ROWS")
    model, tokenizer, saved = _task_model(args, "classify")
    examples, notes = [], []
    for path in args.data:
        rows = read_rows(path)
        columns = classify.find_columns(rows, path, saved.get("text_column"), saved.get("text_pair_column"),
                                        saved.get("label_column"))
        found, skipped = classify.build_examples(rows, columns, saved["labels"], tokenizer, model.config.block_size,
                                                 model.config.arch, saved["template"], path)
        examples += found
        notes += [skipped.summary()] if skipped.count else []
    examples = examples[:args.limit]
    if not examples:
        raise LmforgeError("; ".join(notes) or "no rows to score")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    probabilities = classify.class_probabilities(model, examples, args.batch_size, pad_id)
    progress(len(examples))
    references = np.array([e.label for e in examples])
    predictions = probabilities.argmax(-1).numpy()
    picked = probabilities[np.arange(len(examples)), references].clamp(min=1e-12).log().neg().double().numpy()
    recompute = {"accuracy": lambda p, r, lp: accuracy(list(p), list(r)),
                 "macro_f1": lambda p, r, lp: macro_f1(list(p), list(r)),
                 "loss": lambda p, r, lp: _mean(lp)}
    columns = (predictions, references, picked)
    return Scores({k: f(*columns) for k, f in recompute.items()}, columns, recompute,
                  {"examples": len(examples)}, notes)


@task("qa")
def qa_task(args, progress) -> Scores:
    """An extractive-QA folder's SQuAD exact match and F1 (0..100) over answerable questions."""
    from lmforge.evaluate.metrics import exact_match, token_f1
    from lmforge.finetune import qa
    from lmforge.finetune.predict import answer_questions

    if not args.data:
        raise LmforgeError("--task qa needs --data SQUAD_JSON")
    model, tokenizer, saved = _task_model(args, "qa")
    questions, notes = qa.read_answerable(args.data, args.limit)
    answers = answer_questions(model, tokenizer, saved, questions, args.batch_size)
    progress(len(questions))
    em = np.array([100.0 * exact_match(a["answer"], q.answers) for a, q in zip(answers, questions, strict=True)])
    f1 = np.array([100.0 * token_f1(a["answer"], q.answers) for a, q in zip(answers, questions, strict=True)])
    recompute = {"exact_match": lambda e, f: _mean(e), "f1": lambda e, f: _mean(f)}
    return Scores({"exact_match": _mean(em), "f1": _mean(f1)}, (em, f1), recompute,
                  {"questions": len(questions)}, notes)


@task("instruct")
def instruct_task(args, progress) -> Scores:
    """An instruction-tuned folder's loss and perplexity on its answers (no interval: one pass
    over whole conversations, scored as the run's validation scores them)."""
    from lmforge.finetune.predict import evaluate_file, load_task_model

    if not args.data:
        raise LmforgeError("--task instruct needs --data CONVERSATIONS")
    model, tokenizer, saved = load_task_model(args.model_dir)
    found = evaluate_file(model, tokenizer, saved, args.data, batch_size=args.batch_size)
    return Scores({"loss": found["loss"], "perplexity": found["perplexity"]}, counts={"tokens": found["tokens"]},
                  notes=found["skipped"])


@task("choice")
def choice_task(args, progress) -> Scores:
    """Multiple choice from JSONL {context, choices, label}: the choice with the highest
    log-likelihood (accuracy), or the highest per character (accuracy_norm)."""
    from lmforge.evaluate.choice import character_lengths, choice_scores, read_choices
    from lmforge.model_folder import load_model

    if not args.data or len(args.data) != 1:
        raise LmforgeError("--task choice needs one --data JSONL file of {context, choices, label}")
    examples = read_choices(args.data[0], args.limit)
    model, tokenizer = load_model(args.model_dir)
    scores = choice_scores(model, tokenizer, examples, args.batch_size, progress)
    return choice_result(scores, [e.label for e in examples], character_lengths(examples))


def choice_result(scores: list[list[float]], labels: list[int], lengths: list[list[float]]) -> Scores:
    """Accuracy and accuracy_norm with their resampling (shared with few-shot classification)."""
    from lmforge.evaluate.metrics import choice_accuracy

    columns = (scores, labels, lengths)
    recompute = {name: (lambda s, y, n, name=name: choice_accuracy(s, y, n)[name])
                 for name in ("accuracy", "accuracy_norm")}
    return Scores(choice_accuracy(*columns), columns, recompute, {"examples": len(labels)})


def _seq2seq(args, progress) -> Scores:
    """Decode --src, score against --ref: BLEU and chrF (translate) or ROUGE (summarize)."""
    import tempfile
    from pathlib import Path

    from lmforge.cli.seq2seq import decode_options
    from lmforge.evaluate.metrics import bleu, chrf, rouge
    from lmforge.evaluate.seq2seq import evaluate_files, read_lines

    if not args.src or not args.ref:
        raise LmforgeError(f"--task {args.task} needs --src FILE and --ref FILE")
    if args.data:
        raise LmforgeError(f"--task {args.task} reads --src and --ref, not --data")
    src, ref = args.src, args.ref
    with tempfile.TemporaryDirectory() as scratch:
        if args.limit is not None:  # the first N pairs, as files: evaluate_files reads files
            src, ref = Path(scratch) / "src", Path(scratch) / "ref"
            src.write_text("".join(line + "\n" for line in read_lines(args.src)[:args.limit]), encoding="utf-8")
            ref.write_text("".join(line + "\n" for line in read_lines(args.ref)[:args.limit]), encoding="utf-8")
        hyp = Path(scratch) / "hyp"
        found = evaluate_files(args.model_dir, args.task, src, ref, decode_options(args, args.task == "summarize"),
                               hyp_out=hyp)
        hypotheses, references = hyp.read_text(encoding="utf-8").split("\n")[:-1], read_lines(ref)
    progress(len(hypotheses))
    if args.task == "summarize":
        recompute = {name: (lambda h, r, name=name: rouge(h, r)[name]) for name in ("rouge1", "rouge2", "rougeL")}
    else:
        recompute = {"bleu": lambda h, r: bleu(h, r)["score"], "chrf": lambda h, r: chrf(h, r)["score"]}
    counts = {k: v for k, v in found.items() if k not in recompute}
    return Scores({k: found[k] for k in recompute}, (hypotheses, references), recompute, counts)


TASKS["translate"] = TASKS["summarize"] = _seq2seq
