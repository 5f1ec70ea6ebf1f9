"""`lmforge <verb>`: the command line. Each verb parses flags and calls the library; mistakes a
user can fix end as one line on stderr with exit code 2, never a traceback.

This module holds the parser and `main`; the verbs that train are in training.py, the ones that
use a model folder in commands.py.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import insight, seq2seq, serve
from lmforge.cli.commands import (
    cmd_convert,
    cmd_demo,
    cmd_eval,
    cmd_fill_mask,
    cmd_generate,
    cmd_merge_lora,
    cmd_predict,
    cmd_tokenizer_train,
)
from lmforge.cli.search import cmd_search
from lmforge.cli.training import cmd_finetune, cmd_pretrain
from lmforge.errors import LmforgeError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus a pointer to --help), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The architecture and tokenizer of a new model (a fine-tune takes them from --model)."""
    p.add_argument("--tokenizer", help="a tokenizer.json, or 'char' / 'bpe' to train one (default bpe)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size when training one (default 4096)")
    p.add_argument("--arch", choices=["decoder", "encoder", "encoder-decoder", "lstm"])
    for flag in ("--n-layer", "--n-head", "--n-kv-head", "--n-embd", "--d-ff", "--block-size"):
        p.add_argument(flag, type=int)
    p.add_argument("--position", choices=["learned", "sinusoidal", "relative", "rope", "alibi", "none"])
    p.add_argument("--activation", choices=["gelu", "gelu_tanh", "relu", "swiglu"])
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"])
    p.add_argument("--norm-position", choices=["pre", "post"])
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, help="biases in linear layers and LayerNorm")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags default to None so that a config file's value survives unless a flag is given."""
    p.add_argument("--data", nargs="+", help="training text: files, folders or globs")
    p.add_argument("--val-data", nargs="+", help="held-out text (default: the last --val-fraction of --data)")
    p.add_argument("--config", help="YAML or JSON file whose keys are these flags' names")
    for flag, kind in [
        ("--batch-size", int), ("--grad-accum", int), ("--lr", float), ("--min-lr", float),
        ("--warmup-steps", int), ("--weight-decay", float), ("--grad-clip", float), ("--max-steps", int),
        ("--eval-every", int), ("--eval-batches", int), ("--save-every", int), ("--seed", int),
        ("--dropout", float), ("--attn-dropout", float), ("--val-fraction", float),
        ("--early-stopping-patience", int), ("--label-smoothing", float), ("--l1-penalty", float),
        ("--augment-prob", float),
    ]:
        p.add_argument(flag, type=kind)
    p.add_argument("--seq-len", type=int, help="tokens per training window (default: the model's block size)")
    p.add_argument("--whole-word-mask", action=argparse.BooleanOptionalAction,
                   help="masked LM: choose whole words, all their tokens together (default: single tokens)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (~50 s to compile on CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (default: on only where the hardware has bf16 matrix units)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute blocks in backward: less activation memory, more compute")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, help="under torchrun: shard with FSDP2, not DDP")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, help="drop exact-duplicate documents")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show the progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--out", help="run folder (it becomes a model folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Train, evaluate and generate with Transformer language models.")
    parser.add_argument("--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = verbs.add_parser("demo", help="train a small model on the Python standard library's source")
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    demo.add_argument("--out", default="runs/demo", help="model folder to write (default runs/demo)")
    demo.set_defaults(func=cmd_demo)

    tok = verbs.add_parser("tokenizer", help="tokenizer tools")
    tok_verbs = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    tok_train = tok_verbs.add_parser("train", help="train a char or byte-level BPE tokenizer")
    tok_train.add_argument("--data", nargs="+", required=True)
    tok_train.add_argument("--kind", choices=["char", "bpe"], required=True)
    tok_train.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    tok_train.add_argument("--out", required=True, help="tokenizer.json to write")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    pre = verbs.add_parser("pretrain", help="pretrain a model (causal LM, MLM or denoising)")
    _add_model_flags(pre)
    _add_training_flags(pre)
    pre.set_defaults(func=cmd_pretrain)

    fine = verbs.add_parser("finetune", help="train a model folder (lmforge or Hugging Face) on new text or a task")
    fine.add_argument("--model", help="model folder to start from; its architecture and tokenizer are kept")
    fine.add_argument("--task", choices=["classify", "qa", "instruct"],
                      help="fine-tune for a task: classify labelled texts, answer questions from a context (SQuAD "
                           "JSON), or follow instructions (default: more text)")
    fine.add_argument("--doc-stride", type=int,
                      help="qa: tokens shared by consecutive windows of a long context (default 128)")
    fine.add_argument("--max-answer-tokens", type=int, help="qa: the longest answer, in tokens (default 30)")
    fine.add_argument("--chat-template", help="instruct: a Jinja chat template file (default: the folder's, or plain)")
    fine.add_argument("--text-column", help="classify: the text column (default: sentence or text)")
    fine.add_argument("--text-pair-column", help="classify: the second text of a pair (default: none)")
    fine.add_argument("--label-column", help="classify: the label column (default: label)")
    fine.add_argument("--augment", choices=["delete", "swap"],
                      help="classify: randomly delete or swap tokens of training texts (--augment-prob, seeded)")
    fine.add_argument("--pooling", choices=["cls", "mean", "last"],
                      help="classify: the sequence's vector (default: cls for encoders, last for decoders)")
    fine.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank on the frozen model (e.g. 8)")
    fine.add_argument("--lora-alpha", type=float, help="LoRA: updates are scaled by alpha/rank (default 2*rank)")
    fine.add_argument("--lora-targets", help="LoRA: comma-separated layers out of q,k,v,o,ffn (default q,v)")
    fine.add_argument("--prompt-tuning", type=int, metavar="N",
                      help="train N soft-prompt vectors read before every input, the model frozen (e.g. 20)")
    _add_training_flags(fine)
    fine.set_defaults(func=cmd_finetune)

    search = verbs.add_parser("search", help="hyperparameter search over pretrain or finetune runs (Optuna)")
    search.add_argument("--space", required=True,
                        help="YAML file: option name → {low: A, high: B, log: true} or {choices: [...]}")
    search.add_argument("--trials", type=int, required=True, help="finished trials to stop at (complete or pruned)")
    search.add_argument("--sampler", choices=["grid", "random", "tpe"], default="tpe", help="(default tpe)")
    search.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    search.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    search.add_argument("--storage", help="the study's database URL, shareable (default sqlite:///OUT/study.db)")
    search.add_argument("--seed", type=int, help="the sampler's seed (default: random)")
    search.add_argument("--out", required=True, help="folder for the trials' runs, results and best/")
    search.add_argument("training", nargs="*", metavar="-- pretrain|finetune FLAGS",
                        help="the training command line each trial runs, with its values on top")
    search.set_defaults(func=cmd_search)

    gen = verbs.add_parser("generate", help="generate text from a model folder (or a Hugging Face one)")
    gen.add_argument("model_dir")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--int8", action="store_true", help="int8 weights: faster batch-1 decoding on CPU")
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user's message, formatted by the folder's chat template; print the reply")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step: ~10%% faster per token, 15-50 s to compile once")
    gen.set_defaults(func=cmd_generate)

    fill = verbs.add_parser("fill-mask", help="a masked LM's most likely tokens for each mask in a text")
    fill.add_argument("model_dir", help="an encoder's model folder (lmforge, or a Hugging Face BertForMaskedLM)")
    fill.add_argument("--text", required=True, help="text holding the tokenizer's mask token ([MASK] or <mask>)")
    fill.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    fill.add_argument("--json", action="store_true", help="print one JSON object")
    fill.set_defaults(func=cmd_fill_mask)

    ev = verbs.add_parser("eval", help="held-out perplexity, or a fine-tuned model's task metrics")
    ev.add_argument("model_dir")
    ev.add_argument("--data", nargs="+", required=True)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, help="evaluate only this many batches (default: all)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    for flag in ("--text-column", "--text-pair-column", "--label-column"):
        ev.add_argument(flag, help="a fine-tuned classifier's data: this column (default: the task's, or common names)")
    ev.set_defaults(func=cmd_eval)

    pred = verbs.add_parser("predict", help="a fine-tuned model's predictions (labels and probabilities)")
    pred.add_argument("model_dir")
    pred.add_argument("--input", help="a TSV, CSV, JSONL or TXT file of inputs")
    pred.add_argument("--text", help="one text to classify")
    pred.add_argument("--text-pair", help="the second text of a pair (with --text)")
    pred.add_argument("--question", help="a QA model: the question (with --context)")
    pred.add_argument("--context", help="a QA model: the text that holds the answer")
    pred.add_argument("--max-answer-tokens", type=int, help="a QA model: the longest answer (default: the task's)")
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument("--json", action="store_true", help="one JSON object per input")
    pred.set_defaults(func=cmd_predict)

    conv = verbs.add_parser("convert", help="convert between Hugging Face and lmforge model folders")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face folder (GPT-2, BERT or BART)")
    direction.add_argument("--to-hf", metavar="MODEL_DIR", help="an lmforge model folder")
    conv.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    conv.set_defaults(func=cmd_convert)

    merge = verbs.add_parser("merge-lora", help="fold a LoRA adapter folder into its base: a plain model folder")
    merge.add_argument("adapter_dir", help="a LoRA run's folder (it holds adapter.json)")
    merge.add_argument("--out", required=True, help="model folder to write (must not exist, or be empty)")
    merge.set_defaults(func=cmd_merge_lora)
    seq2seq.register(verbs, _Parser)  # translate, summarize; parallel-data flags of pretrain/finetune/eval
    insight.register(verbs, _Parser)  # eval --task/--bootstrap/--template; attention, lens, plot, report
    serve.register(verbs, _Parser)  # serve: the OpenAI-compatible HTTP server
    return parser


def _version() -> str:
    from lmforge import __version__

    return f"lmforge {__version__}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line are one line each, like errors: no source line under them."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except LmforgeError as exc:
        print(f"lmforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous  # a program calling main() keeps its own format
