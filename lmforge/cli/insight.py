"""Evaluation and insight on the command line: `eval`'s task, interval and prompting flags, and
the verbs that draw (`attention`, `lens`, `plot`, `report`)."""

from __future__ import annotations

import argparse

from lmforge.evaluate.tasks import TASK_NAMES


def register(verbs, parser_class) -> None:
    _add_eval_flags(verbs.choices["eval"])


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    """Added to the eval verb defined in cli/__init__.py; a --task another module added first keeps its choices."""
    actions = {s: a for a in p._actions for s in a.option_strings}
    if "--data" in actions:
        actions["--data"].required = False  # --task translate reads --src/--ref instead
    names = [*TASK_NAMES, "instruct"]
    if "--task" in actions:
        task = actions["--task"]
        task.choices = [*names, *(t for t in task.choices or () if t not in names)]
        task.help = "what to score (default: the folder's task.json, else perplexity)"
    else:
        p.add_argument("--task", choices=names, help="what to score (default: the folder's task.json, else perplexity)")
    group = p.add_argument_group("intervals and progress")
    group.add_argument("--bootstrap", type=int, default=0, metavar="N",
                       help="a 95%% confidence interval for every metric from N resamples of the examples (e.g. 1000)")
    group.add_argument("--seed", type=int, default=0, help="the bootstrap's and the few-shot draw's seed (default 0)")
    group.add_argument("--limit", type=int, metavar="N", help="score the first N examples (documents for perplexity)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       help="a progress bar with examples per second (default: when stderr is a terminal)")
    prompt = p.add_argument_group("zero- and few-shot prompting (a language model, weights unchanged)")
    prompt.add_argument("--template", metavar="FILE|TEXT",
                        help="a prompt whose {field} placeholders each row fills, e.g. 'Review: {sentence} Sentiment:'")
    prompt.add_argument("--shots", type=int, default=0, metavar="K", help="K solved examples before each prompt")
    prompt.add_argument("--shots-file", help="the rows the K shots are drawn from (seeded by --seed)")
    prompt.add_argument("--verbalizer", metavar="'0=terrible,1=great'",
                        help="classify by the log-likelihood of each label's word after the prompt")
    prompt.add_argument("--answer-column",
                        help="generation tasks: the reference column (default target, answer, summary, label)")
    prompt.add_argument("--max-new-tokens", type=int, default=32,
                        help="generation tasks: the longest answer, in tokens (default 32)")
