"""Translation and summarisation quality within a time budget, on 2 CPU cores.

- Multi30k English→German: the Transformer recipe below trained for --minutes, then sacreBLEU
  and chrF on test_2016_flickr, greedy and beam 5; the LSTM baseline with the same budget.
- SciTLDR-A: a summariser trained for --minutes on its 1,992 training abstracts (its dev split
  picks the best checkpoint by ROUGE-L), ROUGE-1/2/L on its test split beside the first-sentence
  baseline; then the same model on DialogSum's test dialogues, which it never saw the like of
  (DialogSum's train split is not available here: evaluation only).

    python benchmarks/seq2seq_bench.py [--minutes 30] [--parts transformer,lstm,summarize] [--readme]

Each part takes ~35 quiet minutes, so they may be run one at a time: with --readme, the parts not
run are carried over from benchmarks/results/seq2seq.json, each with its own command and machine.
--limit N decodes only the first N test examples (a smoke run, not a figure to publish).

ROUGE is against the first reference of each example (SciTLDR: the author's TLDR; DialogSum:
summary1). Prints one JSON object and a markdown table. Never asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MULTI30K, SCITLDR, DIALOGSUM = DATA / "multi30k_en_de", DATA / "scitldr_a", DATA / "dialogsum"
# A base Transformer shrunk to the budget: 3+3 layers of 256 (Multi30k is 29k short sentences; more
# depth trains fewer epochs in 30 minutes), a joint 8k BPE, Vaswani et al.'s label smoothing 0.1,
# dropout 0.1, Adam β2 0.98, a warm-up and lr 1e-3 (a short run wants a large step), about 2,000
# tokens (64 sentence pairs) a batch.
TRANSFORMER = {"arch": "encoder-decoder", "n_layer": 3, "n_decoder_layer": 3, "n_embd": 256, "n_head": 4,
               "d_ff": 1024, "block_size": 128, "vocab_size": 8000, "dropout": 0.1}
LSTM = {"arch": "lstm", "n_layer": 2, "n_decoder_layer": 2, "n_embd": 384, "block_size": 128, "vocab_size": 8000,
        "dropout": 0.2}
TRAIN = {"batch_size": 64, "lr": 1e-3, "min_lr": 5e-5, "warmup_steps": 400, "label_smoothing": 0.1,
         "weight_decay": 0.01, "beta2": 0.98, "val_decode": 300, "progress": False, "bf16": False}
LSTM_TRAIN = {**TRAIN, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 200}
SUMMARY_MODEL = {**TRANSFORMER, "block_size": 512}
SUMMARY_TRAIN = {**TRAIN, "batch_size": 16, "val_decode": 200, "max_source_len": 400, "max_target_len": 64}
CALIBRATION_STEPS = 5
PARTS = ("transformer", "lstm", "summarize")
LIMIT = None  # --limit: decode only the first N test examples
EVAL_SHARE = 0.9  # of the budget left for training steps; validations (greedy decoding) take the rest


def timed_fit(options: dict, seconds: float) -> dict:
    """Prepare a run, time a few steps, size the schedule to the budget, train; the run folder
    ends holding the best validated model."""
    from lmforge.seq2seq.train import prepare_seq2seq_run

    started = time.perf_counter()
    run = prepare_seq2seq_run({**options, "max_steps": 10**6})
    trainer, config = run.trainer, run.trainer.config
    tick = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step()
    per_step = (time.perf_counter() - tick) / CALIBRATION_STEPS
    left = seconds - (time.perf_counter() - started)
    steps = max(CALIBRATION_STEPS + 20, int(left * EVAL_SHARE / per_step))
    config.max_steps = steps
    config.eval_every = config.save_every = max(20, steps // 5)
    config.warmup_steps = min(config.warmup_steps, steps // 8)
    # Plan again once a tenth of the steps have run, at the rate they ran: the first few steps
    # misjudge it (the LSTM's were 2.5× faster than its average, and its run took 95 minutes).
    tick, first = time.perf_counter(), trainer.step
    trainer.fit(until=max(first + 10, steps // 10))
    per_step = (time.perf_counter() - tick) / (trainer.step - first)
    left = seconds - (time.perf_counter() - started)
    steps = max(trainer.step + 20, trainer.step + int(left * EVAL_SHARE / per_step))
    config.max_steps = steps
    config.eval_every = config.save_every = max(20, steps // 5)
    summary = trainer.fit()
    return {"steps": steps, "ms_per_step": 1000 * per_step, "parameters": run.model.num_parameters(),
            "train_minutes": (time.perf_counter() - started) / 60, "best": summary["best"],
            "examples": len(trainer.train_store), "notes": run.corpus_summary.splitlines()}


def decode_and_score(folder: Path, task: str, src: Path, ref: Path, beam: int, **decode) -> dict:
    from lmforge.evaluate.seq2seq import evaluate_files
    from lmforge.seq2seq.decode import DecodeOptions

    if LIMIT is not None:
        src, ref = _head(src, folder.parent), _head(ref, folder.parent)
    options = DecodeOptions(beam=beam, batch_size=32, max_len_a=3.0 if task == "summarize" else 1.5, **decode)
    tick = time.perf_counter()
    result = evaluate_files(folder, task, src, ref, options)
    result["sentences_per_s"] = result["sentences"] / (time.perf_counter() - tick)
    return result


def translation(work: Path, name: str, model: dict, train: dict, minutes: float) -> dict:
    out = work / name
    options = {**model, **train, "task": "translate", "out": str(out),
               "source_file": str(MULTI30K / "train.en"), "target_file": str(MULTI30K / "train.de"),
               "val_source_file": str(MULTI30K / "val.en"), "val_target_file": str(MULTI30K / "val.de")}
    result = {"recipe": {**model, **train}, "training": timed_fit(options, minutes * 60)}
    test_src, test_ref = MULTI30K / "test_2016_flickr.en", MULTI30K / "test_2016_flickr.de"
    result["greedy"] = decode_and_score(out, "translate", test_src, test_ref, beam=1)
    result["beam5"] = decode_and_score(out, "translate", test_src, test_ref, beam=5)
    return result


def _head(path: Path, folder: Path) -> Path:
    """The first LIMIT lines of `path`, as a file in `folder`."""
    out = folder / f"head-{path.name}"
    out.write_text("".join(line + "\n" for line in path.read_text(encoding="utf-8").splitlines()[:LIMIT]),
                   encoding="utf-8")
    return out


def _jsonl_to_lines(path: Path, source_key: str, target_key: str, folder: Path) -> tuple[Path, Path, list[str]]:
    """src/ref files (one text per line) of a JSONL split, and each source's first sentence."""
    sources, targets, leads = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        source, target = row[source_key], row[target_key]
        parts = source if isinstance(source, list) else [s for s in source.split("\n") if s.strip()]
        sources.append(" ".join(" ".join(parts).split()))
        leads.append(" ".join(parts[0].split()))
        targets.append(" ".join((target[0] if isinstance(target, list) else target).split()))
    src, ref = folder / f"{path.stem}.src", folder / f"{path.stem}.ref"
    src.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    ref.write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    return src, ref, leads


def summarisation(work: Path, minutes: float) -> dict:
    from lmforge.evaluate.metrics import rouge

    out = work / "summarizer"
    options = {**SUMMARY_MODEL, **SUMMARY_TRAIN, "task": "summarize", "out": str(out),
               "data": [str(SCITLDR / "train.jsonl")], "val_data": [str(SCITLDR / "dev.jsonl")]}
    result = {"recipe": {**SUMMARY_MODEL, **SUMMARY_TRAIN}, "training": timed_fit(options, minutes * 60)}
    decode = {"no_repeat_ngram_size": 3, "max_len": 60}
    for name, path, keys in (("scitldr", SCITLDR / "test.jsonl", ("source", "target")),
                             ("dialogsum", DIALOGSUM / "dialogsum.test.jsonl", ("dialogue", "summary1"))):
        src, ref, leads = _jsonl_to_lines(path, *keys, work)
        references = ref.read_text(encoding="utf-8").splitlines()
        result[name] = {"greedy": decode_and_score(out, "summarize", src, ref, beam=1, **decode),
                        "beam4": decode_and_score(out, "summarize", src, ref, beam=4, **decode),
                        "first_sentence": rouge(leads, references)}
    return result


def carry_over(result: dict, parts: set[str]) -> None:
    """Parts not run now are taken from the last published JSON, with the command that made them."""
    published = ROOT / "benchmarks" / "results" / "seq2seq.json"
    if not published.is_file():
        return
    earlier = json.loads(published.read_text())
    for part in PARTS:
        if part not in parts and part in earlier:
            result[part] = {"measured_by": earlier.get("command"), "machine": earlier.get("machine"),
                            "minutes": earlier.get("minutes"), **earlier[part]}


def _bleu_row(label: str, r: dict, budget: str) -> str:
    t = r["training"]
    budget = f"{r['minutes']:g} min" if "minutes" in r else budget
    return (f"| {label} | {t['parameters'] / 1e6:.1f}M | {t['steps']:,} steps, {budget} | "
            f"{r['greedy']['bleu']:.1f} / {r['greedy']['chrf']:.1f} | {r['beam5']['bleu']:.1f} / "
            f"{r['beam5']['chrf']:.1f} | {r['greedy']['sentences_per_s']:.0f} / {r['beam5']['sentences_per_s']:.0f} |")


def table(result: dict) -> str:
    lines = []
    budget = f"{result['minutes']:g} min"
    if "transformer" in result or "lstm" in result:
        lines += ["| Multi30k en→de, test_2016_flickr | parameters | training | BLEU / chrF greedy | "
                  "BLEU / chrF beam 5 | sentences/s greedy / beam 5 |", "|---|---:|---:|---:|---:|---:|"]
        for key, label in (("transformer", "Transformer 3+3 × 256"), ("lstm", "LSTM + Luong attention 2+2 × 384")):
            if key in result:
                lines.append(_bleu_row(label, result[key], budget))
        signature = next(result[k]["beam5"]["bleu_signature"] for k in ("transformer", "lstm") if k in result)
        lines.append(f"\nsacreBLEU signature: `{signature}`; detokenised, cased output against the raw references.")
        lines += [f"The {key} row was measured earlier, with `{result[key]['measured_by']}`."
                  for key in ("transformer", "lstm") if "measured_by" in result.get(key, {})]
    if "summarize" in result:
        s = result["summarize"]
        lines += ["", "| summaries (ROUGE-1 / 2 / L) | first sentence | model, greedy | model, beam 4 |",
                  "|---|---:|---:|---:|"]
        for key, label in (("scitldr", "SciTLDR-A test (trained on its train split)"),
                           ("dialogsum", "DialogSum test (evaluation only: no DialogSum training)")):
            row = [label] + [" / ".join(f"{s[key][k][m]:.1f}" for m in ("rouge1", "rouge2", "rougeL"))
                             for k in ("first_sentence", "greedy", "beam4")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append(f"\nThe summariser: the Transformer shape above with a 512 window, trained {budget} "
                     f"({s['training']['steps']:,} steps) from scratch on 1,992 abstracts; beam 4 with "
                     "no repeated trigram. References: the first of each example's.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget of each model (default 30)")
    parser.add_argument("--parts", default="transformer,lstm,summarize", help="which of transformer,lstm,summarize")
    parser.add_argument("--vocab-size", type=int, default=8000, help="the joint BPE's size (default 8000)")
    parser.add_argument("--batch-size", type=int, default=64, help="translation: sentence pairs a step (default 64)")
    parser.add_argument("--limit", type=int, help="decode only the first N test examples (a smoke run)")
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--readme", action="store_true", help="publish the table into README.md")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if args.readme and args.limit is not None:
        sys.exit("--limit makes a smoke run: it is not published with --readme")
    global LIMIT
    LIMIT = args.limit
    if parts - set(PARTS) or not parts:
        sys.exit(f"--parts: choose from transformer, lstm, summarize; got {args.parts}")
    for folder in (MULTI30K, SCITLDR, DIALOGSUM):
        if not folder.is_dir():
            sys.exit(f"benchmark data not found: {folder}")
    torch.manual_seed(0)
    for recipe in (TRANSFORMER, LSTM, SUMMARY_MODEL):
        recipe["vocab_size"] = args.vocab_size
    TRAIN["batch_size"] = LSTM_TRAIN["batch_size"] = args.batch_size
    result = {"command": command_line("seq2seq_bench.py", sys.argv[1:]), "machine": machine(),
              "minutes": args.minutes}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ["LMFORGE_CACHE_DIR"] = str(work / "cache")
        if "transformer" in parts:
            result["transformer"] = translation(work, "transformer", TRANSFORMER, TRAIN, args.minutes)
        if "lstm" in parts:
            result["lstm"] = translation(work, "lstm", LSTM, LSTM_TRAIN, args.minutes)
        if "summarize" in parts:
            result["summarize"] = summarisation(work, args.minutes)
    if args.readme:
        carry_over(result, parts)
    report("seq2seq", result, table(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
