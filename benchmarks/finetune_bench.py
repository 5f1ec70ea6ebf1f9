"""SST-2 on 2 CPU cores: an encoder pretrained here with masked LM, then fine-tuned, against the
same encoder fine-tuned from random initialisation. Target: ≥ 82% dev accuracy within 25 minutes
in all (pretraining included).

Stage 1 trains a byte-level BPE tokenizer and pretrains an encoder with masked LM on the text of
SST-2's training sentences (their labels unused), for a wall-time budget. Stage 2 fine-tunes it on
SST-2 train (67,349 labelled phrases and sentences), for a budget; the baseline fine-tunes the same
architecture, tokenizer and schedule from random weights. Steps are sized from a timed first few,
as `lmforge demo` does. The model kept is the last one (no selection on dev); dev accuracy is
then measured once on all 872 dev sentences. Every stage's wall time is reported, tokenisation
included.

    python benchmarks/finetune_bench.py [--pretrain-minutes 12] [--finetune-minutes 9] [--readme]

Prints one JSON object and a markdown table; --readme also saves the JSON in benchmarks/results/
and the table in README.md. Never asserts a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MODEL = {"arch": "encoder", "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 64, "tokenizer": "bpe",
         "vocab_size": 8192, "type_vocab_size": 0}
PRETRAIN = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "eval_batches": 10, "dropout": 0.1}
FINETUNE = {"batch_size": 64, "lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 100, "dropout": 0.1, "weight_decay": 0.01,
            "val_fraction": 0.02}  # 1,347 held-out train rows: the run's own validation, never dev
CALIBRATION_STEPS = 5


def timed_fit(run, minutes: float) -> dict:
    """Train for about `minutes`: a few timed steps size the schedule, then the rest runs."""
    tick = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        run.trainer.train_step()
    per_step = (time.perf_counter() - tick) / CALIBRATION_STEPS
    steps = max(CALIBRATION_STEPS + 10, int((minutes * 60 - (time.perf_counter() - tick)) / (per_step * 1.05)))
    run.trainer.config.max_steps = steps
    run.trainer.config.eval_every = run.trainer.config.save_every = max(50, steps // 4)
    summary = run.trainer.fit()
    return {"steps": steps, "ms_per_step": 1000 * per_step, "val": summary["val"]}


def pretrain(work: Path, minutes: float) -> dict:
    from lmforge.finetune.tabular import read_rows

    started = time.perf_counter()
    corpus = work / "sst2_train_text.txt"
    corpus.write_text("\n".join(row.fields["sentence"] for row in read_rows(SST2 / "train.tsv")), encoding="utf-8")
    return mlm_pretrain(work, corpus, minutes, {**MODEL, **PRETRAIN}, started)


def mlm_pretrain(work: Path, corpus: Path, minutes: float, options: dict, started: float) -> dict:
    """Masked-LM pretraining of work/mlm on `corpus` for what is left of `minutes` since `started`."""
    from lmforge.train.pretrain import prepare_run

    run = prepare_run({**options, "data": [str(corpus)], "out": str(work / "mlm"), "max_steps": 10**6,
                       "progress": False, "bf16": False})
    prepared = time.perf_counter() - started
    result = timed_fit(run, minutes - prepared / 60)
    return {**result, "seconds": time.perf_counter() - started, "prepare_seconds": prepared,
            "train_tokens": len(run.trainer.train_store)}


def random_start(work: Path) -> Path:
    """The pretrained folder's architecture and tokenizer with fresh weights: the baseline's start."""
    from lmforge.model import build_model
    from lmforge.model_folder import load_model, save_model

    pretrained, tokenizer = load_model(work / "mlm")
    torch.manual_seed(1234)
    save_model(build_model(pretrained.config), work / "random", tokenizer)
    return work / "random"


def finetune(start: Path, out: Path, minutes: float, **options) -> dict:
    """Fine-tune from `start` on SST-2 train for about `minutes`; `options` add to or replace FINETUNE
    (LoRA's, in lora_bench.py). Scores the last model once on dev."""
    from lmforge.finetune.predict import evaluate_file, load_task_model
    from lmforge.finetune.run import prepare_task_run

    started = time.perf_counter()
    run = prepare_task_run({**FINETUNE, "task": "classify", "init": str(start), "data": [str(SST2 / "train.tsv")],
                            "out": str(out), "max_steps": 10**6, "progress": False, "bf16": False, **options})
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    result = timed_fit(run, minutes - (time.perf_counter() - started) / 60)
    model, tokenizer, task = load_task_model(out)
    dev = evaluate_file(model, tokenizer, task, [str(SST2 / "dev.tsv")])
    return {**result, "seconds": time.perf_counter() - started, "dev_accuracy": dev["accuracy"],
            "dev_macro_f1": dev["macro_f1"], "dev_examples": dev["examples"], "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in model.parameters())}


def table(result: dict) -> str:
    pre, ours, base = result["pretrain"], result["pretrained_finetune"], result["random_finetune"]
    lines = ["| | pretraining (MLM) | fine-tuning | wall time in all | SST-2 dev accuracy | dev macro-F1 |",
             "|---|---:|---:|---:|---:|---:|",
             f"| MLM-pretrained encoder | {pre['steps']} steps, {pre['seconds'] / 60:.1f} min | {ours['steps']} steps, "
             f"{ours['seconds'] / 60:.1f} min | {(pre['seconds'] + ours['seconds']) / 60:.1f} min | "
             f"{100 * ours['dev_accuracy']:.1f}% | {ours['dev_macro_f1']:.3f} |",
             f"| same encoder, random start | – | {base['steps']} steps, {base['seconds'] / 60:.1f} min | "
             f"{base['seconds'] / 60:.1f} min | {100 * base['dev_accuracy']:.1f}% | {base['dev_macro_f1']:.3f} |"]
    shape = result["model"]
    lines.append(f"\nEncoder: {shape['n_layer']} layers × {shape['n_embd']}, {shape['n_head']} heads, block "
                 f"{shape['block_size']}, BPE {shape['vocab_size']}; {result['parameters'] / 1e6:.2f}M parameters. "
                 f"MLM on the text of SST-2 train ({pre['train_tokens']:,} tokens, labels unused); fine-tuning on "
                 f"SST-2 train, the last model scored once on the {ours['dev_examples']} dev sentences (majority "
                 "class: 50.9%).")
    return "\n".join(lines)


def budget_parser(description: str, pretrain_minutes: float, finetune_minutes: float) -> argparse.ArgumentParser:
    """The flags the SST-2 benchmarks share: each stage's wall-time budget and where results go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pretrain-minutes", type=float, default=pretrain_minutes)
    parser.add_argument("--finetune-minutes", type=float, default=finetune_minutes)
    parser.add_argument("--readme", action="store_true", help="also save JSON in benchmarks/results/, table in README")
    parser.add_argument("--json-out")
    return parser


@contextmanager
def workspace():
    """A throwaway folder for runs and the token cache; the data must be there."""
    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"benchmark data not found: {SST2}")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["LMFORGE_CACHE_DIR"] = str(Path(folder) / "cache")
        yield Path(folder)


def main() -> None:
    args = budget_parser(__doc__.splitlines()[0], 12.0, 9.0).parse_args()
    with workspace() as work:
        result = {"command": command_line("finetune_bench.py", sys.argv[1:]), "machine": machine(),
                  "benchmark": "SST-2: MLM pretraining then fine-tuning, against fine-tuning from random weights",
                  "model": MODEL, "pretrain_config": PRETRAIN, "finetune_config": FINETUNE}
        result["pretrain"] = pretrain(work, args.pretrain_minutes)
        from lmforge.model_folder import load_model

        result["parameters"] = load_model(work / "mlm")[0].num_parameters()
        result["pretrained_finetune"] = finetune(work / "mlm", work / "ft", args.finetune_minutes)
        result["random_finetune"] = finetune(random_start(work), work / "ft-random", args.finetune_minutes)
    report("finetune_sst2", result, table(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
