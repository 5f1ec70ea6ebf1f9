"""`lmforge <verb>`: the command line. Each verb parses flags and calls the library; mistakes a
user can fix end as one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus a pointer to --help), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The architecture and tokenizer of a new model (a fine-tune takes them from --model)."""
    p.add_argument("--tokenizer", help="a tokenizer.json, or 'char' / 'bpe' to train one (default bpe)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size when training one (default 4096)")
    p.add_argument("--arch", choices=["decoder", "encoder", "encoder-decoder"])
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


def _options(args: argparse.Namespace, skip: tuple[str, ...] = ("command", "config", "func")) -> dict:
    """Config file values, overridden by every flag actually given."""
    from lmforge.config import read_config_file

    options = dict(read_config_file(args.config)) if getattr(args, "config", None) else {}
    options = {k.replace("-", "_"): v for k, v in options.items()}
    options.update({k: v for k, v in vars(args).items() if v is not None and k not in skip})
    return options


def cmd_pretrain(args) -> int:
    options = _options(args)
    if "init" in options:  # prepare_run's way in for finetune; here it would be a silent fine-tune
        raise LmforgeError("unknown option(s): init (to start from a model folder: lmforge finetune --model)")
    return _train(options)


def cmd_finetune(args) -> int:
    from lmforge.train.pretrain import FINETUNE_DEFAULTS

    options = _options(args)  # a config file may name the start folder `model`, like the flag
    model = options.pop("model", None)
    if model:
        options["init"] = model
    if options.get("task"):
        from lmforge.finetune.run import prepare_task_run

        return _train(options, prepare=prepare_task_run)
    task_flags = sorted(k for k in ("text_column", "text_pair_column", "label_column", "pooling", "chat_template")
                        if k in options)
    if task_flags:
        raise LmforgeError(f"{', '.join('--' + k.replace('_', '-') for k in task_flags)} need --task")
    return _train(options, train_defaults=FINETUNE_DEFAULTS, require_init=True)


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
              f"model: {model.config.arch}{' classifier' if model.config.n_labels else ''}, "
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
    if summary["skipped_steps"]:
        line += f", {summary['skipped_steps']} non-finite steps skipped"
    best = summary.get("best")
    if best and best["step"] is not None:
        how = "stopped early: no better validation for a while; " if summary.get("stopped_early") else ""
        line += f"; {how}best val {best['metric']} {best['value']:.4f} at step {best['step']} (the folder's model)"
    print(f"{line}; model folder: {run_dir}")


def cmd_tokenizer_train(args) -> int:
    from lmforge.data.corpus import load_corpus
    from lmforge.tokenize import Tokenizer

    documents, stats = load_corpus(args.data)
    tokenizer = Tokenizer.train(args.kind, documents, vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens, from {stats.summary()} → {args.out}")
    return 0


def _generation_config(args):
    from lmforge.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop or ()), seed=args.seed, compile=getattr(args, "compile", False),
    )


def cmd_generate(args) -> int:
    import torch

    from lmforge.generate import generate, stream
    from lmforge.model_folder import load_model

    config = _generation_config(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_dir)
    if args.int8:
        from lmforge.quantize import quantize_int8

        model = quantize_int8(model)
    prompts = shown = args.prompt
    if args.chat:  # each prompt is a user's turn in the folder's chat template; only the reply is printed
        from lmforge.finetune.instruct import chat_prompts

        prompts, shown = chat_prompts(args.model_dir, tokenizer, args.prompt), [""] * len(prompts)
    if args.stream:
        for index, prompt in enumerate(prompts):
            pieces = stream(model, tokenizer, [prompt], config)
            first = next(pieces)  # any error surfaces before anything is printed
            print(("\n" + "-" * 40 + "\n" if index else "") + shown[index] + first[0], end="", flush=True)
            for piece in pieces:
                print(piece[0], end="", flush=True)
            print()
        return 0
    outputs = generate(model, tokenizer, prompts, config)
    for index, (prompt, text) in enumerate(zip(args.prompt, outputs, strict=True)):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}))
            continue
        if index:
            print("-" * 40)
        print(shown[index] + text)
    return 0


def cmd_fill_mask(args) -> int:
    from dataclasses import asdict

    from lmforge.fill_mask import fill_mask_folder

    masks = fill_mask_folder(args.model_dir, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "masks": [[asdict(p) for p in mask] for mask in masks]},
                         ensure_ascii=False))
        return 0
    for index, predictions in enumerate(masks, 1):
        print(f"mask {index} of {len(masks)}:")
        for p in predictions:
            print(f"  {p.score:.4f}  {json.dumps(p.token_str, ensure_ascii=False)}")
    return 0


def cmd_eval(args) -> int:
    from lmforge.evaluate.perplexity import evaluate_corpus
    from lmforge.model_folder import load_model, read_task

    if read_task(args.model_dir) is not None:
        return _eval_task(args)
    model, tokenizer = load_model(args.model_dir)
    if model.config.n_labels:
        raise LmforgeError(f"{args.model_dir} is a sequence classifier with no task.json: no label names to score")
    result = evaluate_corpus(model, tokenizer, args.data, batch_size=args.batch_size, max_batches=args.max_batches)
    if args.json:
        print(json.dumps(result))
    else:
        line = f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}"
        if "bits_per_byte" in result:
            line += f"  bits/byte {result['bits_per_byte']:.4f}"
        print(f"{line}  ({result['tokens']:,} tokens)")
    return 0


def _eval_task(args) -> int:
    from lmforge.finetune.predict import eval_command

    return eval_command(args)


def cmd_predict(args) -> int:
    from lmforge.finetune.predict import predict_command

    return predict_command(args)


def cmd_convert(args) -> int:
    from lmforge.model_folder import convert_from_hf, convert_to_hf

    if args.from_hf:
        model = convert_from_hf(args.from_hf, args.out)
        source, kind = args.from_hf, "Hugging Face"
    else:
        model = convert_to_hf(args.to_hf, args.out)
        source, kind = args.to_hf, "lmforge"
    config = model.config
    print(
        f"{kind} {source} → {args.out}: {config.arch}, {config.n_layer} layers × {config.n_embd}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters"
    )
    return 0


def cmd_demo(args) -> int:
    from lmforge.demo import run_demo

    return run_demo(minutes=args.minutes, out=args.out)


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
    fine.add_argument("--task", choices=["classify", "instruct"],
                      help="fine-tune for a task: classify labelled texts, or answer instructions (default: more text)")
    fine.add_argument("--chat-template", help="instruct: a Jinja chat template file (default: the folder's, or plain)")
    fine.add_argument("--text-column", help="classify: the text column (default: sentence or text)")
    fine.add_argument("--text-pair-column", help="classify: the second text of a pair (default: none)")
    fine.add_argument("--label-column", help="classify: the label column (default: label)")
    fine.add_argument("--augment", choices=["delete", "swap"],
                      help="classify: randomly delete or swap tokens of training texts (--augment-prob, seeded)")
    fine.add_argument("--pooling", choices=["cls", "mean", "last"],
                      help="classify: the sequence's vector (default: cls for encoders, last for decoders)")
    _add_training_flags(fine)
    fine.set_defaults(func=cmd_finetune)

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
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument("--json", action="store_true", help="one JSON object per input")
    pred.set_defaults(func=cmd_predict)

    conv = verbs.add_parser("convert", help="convert between Hugging Face and lmforge model folders")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face folder (GPT-2, BERT or BART)")
    direction.add_argument("--to-hf", metavar="MODEL_DIR", help="an lmforge model folder")
    conv.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    conv.set_defaults(func=cmd_convert)
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
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except LmforgeError as exc:
        print(f"lmforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
