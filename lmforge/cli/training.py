"""The verbs that train: `pretrain` and `finetune` (language modelling or a task), and what they print."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lmforge.errors import LmforgeError


def _options(args: argparse.Namespace, skip: tuple[str, ...] = ("command", "config", "func")) -> dict:
    """Config file values, overridden by every flag actually given."""
    from lmforge.config import read_config_file

    options = dict(read_config_file(args.config)) if getattr(args, "config", None) else {}
    options = {k.replace("-", "_"): v for k, v in options.items()}
    options.update({k: v for k, v in vars(args).items() if v is not None and k not in skip})
    return options


def cmd_pretrain(args) -> int:
    """Both training verbs: plan_run tells them apart by args.command."""
    options, prepare, how = plan_run(args)
    return _train(options, prepare, **how)


cmd_finetune = cmd_pretrain


def plan_run(args: argparse.Namespace) -> tuple[dict, Callable, dict]:
    """What a pretrain or finetune command line asks for: its options, the function that prepares
    its run, and that function's keyword arguments. `search` prepares each trial the same way."""
    from lmforge.train.pretrain import FINETUNE_DEFAULTS, prepare_run

    options = _options(args)
    from lmforge.seq2seq.train import prepare_seq2seq_run, wants_seq2seq

    if wants_seq2seq(args.command, options):  # translation and summaries: parallel data, seq2seq/train.py
        if "model" in options:
            options["init"] = options.pop("model")
        return options, prepare_seq2seq_run, {}
    if args.command == "pretrain":
        if "init" in options:  # prepare_run's way in for finetune; here it would be a silent fine-tune
            raise LmforgeError("unknown option(s): init (to start from a model folder: lmforge finetune --model)")
        return options, prepare_run, {}
    model = options.pop("model", None)  # a config file may name the start folder `model`, like the flag
    if model:
        options["init"] = model
    if options.get("task"):
        from lmforge.finetune.run import prepare_task_run

        return options, prepare_task_run, {}
    task_flags = sorted(k for k in ("text_column", "text_pair_column", "label_column", "pooling", "chat_template",
                                    "doc_stride", "max_answer_tokens") if k in options)
    if task_flags:
        raise LmforgeError(f"{', '.join('--' + k.replace('_', '-') for k in task_flags)} need --task")
    return options, prepare_run, {"train_defaults": FINETUNE_DEFAULTS, "require_init": True}


def _train(options: dict, prepare=None, **how) -> int:
    """pretrain and finetune: one run on this process (or this rank of a torchrun job)."""
    from lmforge.train.distributed import shutdown_world
    from lmforge.train.pretrain import prepare_run

    run = (prepare or prepare_run)(options, **how)
    main = run.trainer.world.is_main  # under torchrun, rank 0 speaks for all
    try:
        if main:
            _print_run_header(run)
        summary = run.trainer.fit()
        if main:
            _print_summary(summary, run.trainer.run_dir)
    finally:
        shutdown_world(run.trainer.world)
    return 0


def _print_run_header(run) -> None:
    model, trainer = run.model, run.trainer
    if trainer.task is not None:  # labelled examples, not a token stream
        print(run.corpus_summary)
        print(f"data: {len(trainer.train_store):,} train / {len(trainer.val_store):,} val examples; "
              f"model: {model.config.arch}{' classifier' if model.config.n_labels else ''}"
              f"{' span extractor' if model.config.span_head else ''}, "
              f"{model.num_parameters() / 1e6:.2f}M parameters")
        _print_start(run)
        return
    if run.corpus_summary:
        print(f"corpus: {run.corpus_summary}")
    print(
        f"data: {len(trainer.train_store):,} train / {len(trainer.val_store):,} val tokens; "
        f"tokenizer: {run.tokenizer.kind}, {run.tokenizer.vocab_size} tokens"
    )
    print(
        f"model: {model.config.arch}, {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{model.flops_per_token() / 1e6:.1f} MFLOP per trained token"
    )
    unk = run.tokenizer.unk_id
    unknown = trainer.train_store.count(unk) / max(len(trainer.train_store), 1) if unk is not None else 0.0
    if unknown >= 0.001:  # a char tokenizer reused on new text (finetune, --tokenizer FILE) maps new characters here
        print(f"note: {unknown:.1%} of the training tokens are unknown to the tokenizer")
    _print_start(run)


def _print_start(run) -> None:
    if getattr(run.model, "lora", None) is not None:
        from lmforge.finetune.lora import trainable_line

        print(trainable_line(run.model))
    if run.init and not run.resumed:
        print(f"starting from {run.init}")
    if run.resumed:
        print(f"resuming at step {run.trainer.step}")


def _print_summary(summary: dict, run_dir) -> None:
    val = summary.get("val") or {}
    line = f"done: step {summary['step']}"
    if "perplexity" in val:
        line += f", val loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}"
    elif "accuracy" in val:
        line += f", val accuracy {val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f}"
    elif "exact_match" in val:
        line += f", val exact match {val['exact_match']:.2f}, F1 {val['f1']:.2f}"
    if summary["skipped_steps"]:
        line += f", {summary['skipped_steps']} non-finite steps skipped"
    best = summary.get("best")
    if best and best["step"] is not None:
        how = "stopped early: no better validation for a while; " if summary.get("stopped_early") else ""
        line += f"; {how}best val {best['metric']} {best['value']:.4f} at step {best['step']} (the folder's model)"
    print(f"{line}; model folder: {run_dir}")
