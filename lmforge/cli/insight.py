"""Evaluation and insight on the command line: `eval`'s task, interval and prompting flags, and
the verbs that draw (`attention`, `lens`, `plot`, `report`)."""

from __future__ import annotations

import argparse

from lmforge.evaluate.tasks import TASK_NAMES


def register(verbs, parser_class) -> None:
    _add_eval_flags(verbs.choices["eval"])
    for name, what in (("attention", "attention heatmaps of a text: one PNG per layer, the heads as a grid"),
                       ("lens", "logit lens: the top tokens each layer would predict (PNG table and JSON)")):
        p = verbs.add_parser(name, help=what)
        p.add_argument("model_dir")
        p.add_argument("--text", required=True, help="the text to look at (an encoder-decoder's source)")
        p.add_argument("--target", help="encoder-decoder: the decoder's text (default: --text)")
        p.add_argument("--out", required=True, help="folder for the PNGs (created)")
        if name == "lens":
            p.add_argument("--top-k", type=int, default=5, help="tokens per layer and position in the JSON (default 5)")
        p.set_defaults(func=cmd_attention if name == "attention" else cmd_lens)
    plot = verbs.add_parser("plot", help="training curves of run folders (several runs overlaid)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="plots", help="folder for the PNGs (default plots)")
    plot.set_defaults(func=cmd_plot)
    report = verbs.add_parser("report", help="one self-contained HTML page about a run")
    report.add_argument("run_dir")
    report.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")
    report.add_argument("--prompt", action="append", help="a sample's prompt (repeatable; default: the data's start)")
    report.set_defaults(func=cmd_report)


def cmd_attention(args) -> int:
    from lmforge.insight.attention import write_attention
    from lmforge.model_folder import load_model

    model, tokenizer = load_model(args.model_dir)
    for path in write_attention(model, tokenizer, args.text, args.out, args.target):
        print(path)
    return 0


def cmd_lens(args) -> int:
    from lmforge.insight.attention import write_lens
    from lmforge.model_folder import load_model

    model, tokenizer = load_model(args.model_dir)
    for path in write_lens(model, tokenizer, args.text, args.out, args.top_k, args.target):
        print(path)
    return 0


def cmd_plot(args) -> int:
    from lmforge.insight.plots import plot_runs

    for path in plot_runs(args.run_dirs, args.out)["files"]:
        print(path)
    return 0


def cmd_report(args) -> int:
    from lmforge.insight.report import write_report

    print(write_report(args.run_dir, args.out, args.prompt))
    return 0


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
