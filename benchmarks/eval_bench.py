"""Evaluation speed against lm-evaluation-harness, and SST-2 zero/few-shot accuracy.

Part 1 (speed). A GPT-2-small-shaped decoder (12 layers x 768, 12 heads, 1024 positions, 50,257
token vocabulary, random weights: speed does not depend on what the weights know) is saved as an
lmforge folder and converted with `convert --to-hf`. The same requests then go to lmforge's
harness model (`--model lmforge`, evaluate/harness.py) and to the harness's own `hf` model on the
converted folder, in this process, one after the other:
  - perplexity: loglikelihood_rolling over PTB test documents (every token scored once);
  - multiple choice: loglikelihood of 4 continuations per PTB sentence (its own end, and the ends
    of three other sentences), after the sentence before it and its own first half.
Examples per second for each, and the largest difference between the two models' scores (equal
scores: the speed-up is not bought with different numbers). Target: >= 1.5x.

Part 2 (only with --model DIR, a decoder trained here). SST-2 dev accuracy by verbaliser
log-likelihood (`eval --template ... --verbalizer 0=terrible,1=great`), zero-shot and 8-shot
(shots from train.tsv, seed 0), beside chance (the majority class) and the fine-tuned model of
benchmarks/finetune_bench.py (its saved result, if there).

    python benchmarks/eval_bench.py [--docs 8] [--questions 64] [--batch-size 8] [--threads N] [--model DIR]
                                    [--readme]

Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PTB, SST2 = DATA / "ptb", DATA / "sst2"
GPT2_SMALL = dict(arch="decoder", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                  position="learned", norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True)
TEMPLATE = "Review: {sentence}\nSentiment:"


def build_folders(work: Path) -> tuple[Path, Path]:
    """An lmforge GPT-2-small folder (a byte-level BPE trained on PTB, ids padded to GPT-2's
    50,257) and its Hugging Face conversion."""
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import LanguageModel
    from lmforge.model_folder import convert_to_hf, save_model
    from lmforge.tokenize import Tokenizer

    tokenizer = Tokenizer.train("bpe", [(PTB / "ptb.train.txt").read_text()], vocab_size=8192)
    torch.manual_seed(0)
    config = ModelConfig(**GPT2_SMALL, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    save_model(LanguageModel(config).eval(), work / "lmforge", tokenizer)
    convert_to_hf(work / "lmforge", work / "hf")
    return work / "lmforge", work / "hf"


def requests(n_docs: int, n_questions: int):
    """Rolling requests (PTB test documents of ~60 lines) and multiple-choice requests."""
    from lm_eval.api.instance import Instance

    lines = [line.strip() for line in (PTB / "ptb.test.txt").read_text().splitlines() if line.strip()]
    docs = ["\n".join(lines[i * 60:(i + 1) * 60]) for i in range(n_docs)]
    rolling = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(docs)]
    rng = random.Random(0)
    candidates = [i for i in range(1, len(lines)) if len(lines[i].split()) >= 8]
    chosen = rng.sample(candidates, n_questions + 3)
    picked = [lines[i] for i in chosen]
    choice, gold = [], []
    for q in range(n_questions):
        words = picked[q].split()
        context = lines[chosen[q] - 1] + "\n" + " ".join(words[:len(words) // 2])  # the sentence before, too
        ends = [" ".join(words[len(words) // 2:])] + [" ".join(picked[(q + k) % len(picked)].split()[len(words) // 2:])
                                                     for k in (1, 2, 3)]
        order = rng.sample(range(4), 4)
        gold.append(order.index(0))
        choice += [Instance("loglikelihood", {}, (context, " " + ends[i]), q) for i in order]
    return rolling, choice, gold


def timed(function, items) -> tuple[list, float]:
    start = time.perf_counter()
    out = function(items)
    return out, time.perf_counter() - start


def race(ours, theirs, items) -> tuple[list, float, list, float]:
    """Both warmed up (lmforge's kernels build on first use), then timed in turns, best of two
    each: a machine shared with other work slows both alike."""
    ours(items[:2])
    theirs(items[:2])
    (a, t1), (b, u1) = timed(ours, items), timed(theirs, items)
    (_, t2), (_, u2) = timed(ours, items), timed(theirs, items)
    return a, min(t1, t2), b, min(u1, u2)


def speed(args, work: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    from lmforge.evaluate.harness import LmforgeLM

    ours_dir, hf_dir = build_folders(work)
    rolling, choice, gold = requests(args.docs, args.questions)
    ours = LmforgeLM(str(ours_dir), batch_size=args.batch_size)
    theirs = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32")
    result = {}
    for name, items, method in (("perplexity", rolling, "loglikelihood_rolling"),
                                ("multiple_choice", choice, "loglikelihood")):
        with torch.inference_mode():
            a, t_ours, b, t_hf = race(getattr(ours, method), getattr(theirs, method), items)
        a_scores = [x if isinstance(x, float) else x[0] for x in a]
        b_scores = [x if isinstance(x, float) else x[0] for x in b]
        examples = len(items) if name == "perplexity" else len(items) // 4
        entry = {"examples": examples, "lmforge_examples_per_s": examples / t_ours,
                 "hf_examples_per_s": examples / t_hf, "speedup": t_hf / t_ours,
                 "max_score_difference": max(abs(x - y) for x, y in zip(a_scores, b_scores, strict=True))}
        if name == "multiple_choice":
            for who, scores in (("lmforge", a_scores), ("hf", b_scores)):
                picks = [max(range(4), key=lambda i, q=q: scores[4 * q + i]) for q in range(len(gold))]
                entry[f"{who}_accuracy"] = sum(p == g for p, g in zip(picks, gold, strict=True)) / len(gold)
        else:
            tokens = sum(len(ours.tokenizer.encode(r.args[0])) for r in items)
            entry["tokens"] = tokens
            entry["lmforge_perplexity"] = float(torch.exp(torch.tensor(-sum(a_scores) / tokens)))
            entry["hf_perplexity"] = float(torch.exp(torch.tensor(-sum(b_scores) / tokens)))
        result[name] = entry
    return result


def sst2(args) -> dict:
    """Zero- and 8-shot verbaliser accuracy on SST-2 dev through lmforge eval."""
    import contextlib
    import io

    from lmforge.cli import main

    labels = [line.rsplit("\t", 1)[1] for line in (SST2 / "dev.tsv").read_text().splitlines()[1:] if line.strip()]
    result = {"dev_examples": len(labels), "chance_majority": max(labels.count("0"), labels.count("1")) / len(labels)}
    for shots in (0, 8):
        argv = ["eval", args.model, "--data", str(SST2 / "dev.tsv"), "--template", TEMPLATE,
                "--verbalizer", "0=terrible,1=great", "--json", "--batch-size", str(args.batch_size)]
        if shots:
            argv += ["--shots", str(shots), "--shots-file", str(SST2 / "train.tsv")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if main(argv) != 0:
                raise SystemExit(f"eval failed: {' '.join(argv)}")
        result[f"{shots}_shot_accuracy"] = json.loads(out.getvalue())["accuracy"]
    fine_tuned = ROOT / "benchmarks" / "results" / "finetune_sst2.json"
    if fine_tuned.is_file():
        result["fine_tuned_result_file"] = str(fine_tuned.relative_to(ROOT))
    return result


def table(result: dict) -> str:
    rows = ["| workload | examples | lmforge ex/s | lm-eval hf ex/s | speed-up | max score difference |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, entry in result["speed"].items():
        rows.append(f"| {name.replace('_', ' ')} | {entry['examples']} | {entry['lmforge_examples_per_s']:.2f} | "
                    f"{entry['hf_examples_per_s']:.2f} | {entry['speedup']:.2f}x | "
                    f"{entry['max_score_difference']:.2e} |")
    if "sst2" in result:
        s = result["sst2"]
        rows += ["", "| SST-2 dev | accuracy |", "|---|---:|", f"| chance (majority) | {s['chance_majority']:.3f} |",
                 f"| zero-shot | {s['0_shot_accuracy']:.3f} |", f"| 8-shot | {s['8_shot_accuracy']:.3f} |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8, help="PTB test documents of 60 lines for perplexity")
    parser.add_argument("--questions", type=int, default=64, help="multiple-choice questions (4 choices each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", help="a decoder folder trained here: SST-2 zero- and 8-shot accuracy")
    parser.add_argument("--threads", type=int, help="torch threads for both models (default: torch's own); "
                                                    "1 is steadier on a machine shared with other work")
    parser.add_argument("--json-out")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        result = {"command": command_line("eval_bench.py", sys.argv[1:]), "machine": machine(),
                  "speed": speed(args, Path(scratch))}
    if args.model:
        result["sst2"] = sst2(args)
    report("eval", result, table(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
