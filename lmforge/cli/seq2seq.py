"""Seq2seq on the command line: `translate` and `summarize`, the parallel-data flags of `pretrain`
and `finetune`, and `eval --task translate|summarize`'s flags."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError

SEQ2SEQ_TASKS = ("translate", "summarize")


def register(verbs, parser_class) -> None:
    for name in ("pretrain", "finetune"):
        _add_data_flags(verbs.choices[name], pretrain=name == "pretrain")
    for name, what in (("translate", "translate"), ("summarize", "summarise")):
        p = verbs.add_parser(name, help=f"{what} texts with a seq2seq model folder; results in input order")
        p.add_argument("model_dir")
        p.add_argument("--input", help="a text file, one input per line ('-' reads stdin)")
        p.add_argument("--text", action="append", help=f"a text to {what} (repeatable)")
        _add_decode_flags(p)
        p.add_argument("--n-best", type=int, default=1, help="print the K best outputs of each input (needs --beam K)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--json", action="store_true", help="one JSON object per input, with the n-best and scores")
        p.set_defaults(func=cmd_seq2seq)
    _add_eval_flags(verbs.choices["eval"])


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam: scores / length**penalty (default 1)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="beam: never repeat an n-gram of this size")
    p.add_argument("--min-length", type=int, default=0, help="no end of text before this many tokens")
    p.add_argument("--max-length", type=int, help="at most this many tokens (default: 1.5 x source + 10, "
                                                  "summaries 3 x; and the model's block size)")


def _add_data_flags(p: argparse.ArgumentParser, pretrain: bool) -> None:
    group = p.add_argument_group("translation and summarisation (--task translate|summarize)")
    for flag, text in (("--source-file", "source texts, one per line, aligned with --target-file"),
                       ("--target-file", "target texts, line by line"),
                       ("--val-source-file", "validation sources (default: a --val-fraction of the pairs)"),
                       ("--val-target-file", "validation targets"),
                       ("--source-column", "TSV/JSONL --data: the source column (default source, document, ...)"),
                       ("--target-column", "TSV/JSONL --data: the target column (default target, summary, ...)")):
        group.add_argument(flag, help=text)
    group.add_argument("--max-source-len", type=int, help="drop pairs whose source is longer, in tokens "
                                                           "(summaries: truncate it; default the block size)")
    group.add_argument("--max-target-len", type=int, help="drop pairs whose target is longer (default the block size)")
    group.add_argument("--max-length-ratio", type=float, help="drop pairs whose longer side exceeds the shorter "
                                                              "this many times (default 3 for translation)")
    group.add_argument("--val-decode", type=int, help="validation pairs decoded for BLEU/ROUGE-L (default 500/200)")
    if pretrain:
        group.add_argument("--task", choices=SEQ2SEQ_TASKS, help="train a translator or a summariser from scratch")
        group.add_argument("--objective", choices=["clm", "mlm", "denoise", "span", "seq2seq"],
                           help="default: the arch's (clm, mlm, denoise); span: T5's span corruption "
                                "(encoder-decoder, monolingual --data); seq2seq: parallel data (implied by --task)")
        group.add_argument("--separate-vocab", action=argparse.BooleanOptionalAction,
                           help="a BPE per side instead of one joint BPE")
    else:
        task = next(a for a in p._actions if "--task" in a.option_strings)
        task.choices = [*task.choices, *(t for t in SEQ2SEQ_TASKS if t not in task.choices)]


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    """eval's seq2seq flags, added only where the eval verb does not define them itself."""
    actions = {s: a for a in p._actions for s in a.option_strings}
    if "--task" in actions:
        task = actions["--task"]
        if task.choices is not None:
            task.choices = [*task.choices, *(t for t in SEQ2SEQ_TASKS if t not in task.choices)]
    else:
        p.add_argument("--task", choices=SEQ2SEQ_TASKS, help="score a translator (BLEU, chrF) or a summariser (ROUGE)")
    if "--data" in actions:
        actions["--data"].required = False  # --task translate reads --src/--ref instead
    group = p.add_argument_group("translation and summarisation")
    if "--src" not in actions:
        group.add_argument("--src", help="--task translate|summarize: the inputs, one per line")
    if "--ref" not in actions:
        group.add_argument("--ref", help="the references, line by line")
    if "--beam" not in actions:
        _add_decode_flags(group)


def decode_options(args, summarize: bool):
    from lmforge.seq2seq.decode import DecodeOptions

    return DecodeOptions(beam=args.beam, n_best=getattr(args, "n_best", 1), batch_size=args.batch_size,
                         max_len_a=3.0 if summarize else 1.5, max_len=args.max_length, min_len=args.min_length,
                         length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)


def _inputs(args) -> list[str]:
    if (args.input is None) == (args.text is None):
        raise LmforgeError("give exactly one of --input FILE or --text TEXT")
    if args.text is not None:
        return args.text
    from lmforge.evaluate.seq2seq import read_lines

    return sys.stdin.read().splitlines() if args.input == "-" else read_lines(args.input)


def cmd_seq2seq(args) -> int:
    """`translate`/`summarize MODEL_DIR (--input FILE | --text TEXT)`: one output line per input."""
    from lmforge.evaluate.seq2seq import load_seq2seq
    from lmforge.seq2seq.decode import decode_texts

    summarize = args.command == "summarize"
    options = decode_options(args, summarize)
    options.check()
    texts = _inputs(args)
    model, sides, task = load_seq2seq(args.model_dir)
    for text, found in zip(texts, decode_texts(model, sides, texts, options, task),
                           strict=False):
        if args.json:
            print(json.dumps({"input": text, "outputs": [{"text": t, "score": s} for t, s in found]},
                             ensure_ascii=False), flush=True)
        elif options.n_best > 1:
            print("\n".join(f"{t}\t{s:.4f}" for t, s in found) + "\n", flush=True)
        else:
            print(found[0][0], flush=True)
    return 0
