"""`lmforge demo`: the whole pipeline in a few minutes, on text every Python machine has.

Corpus: the running interpreter's standard-library source. The demo trains a byte-level BPE
tokenizer and a small GPT-style decoder for a time budget (steps are sized from a measured
step time), reports held-out perplexity, prints completions of code prompts, and leaves a
model folder that `lmforge generate` and `lmforge eval` accept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lmforge import kernels
from lmforge.atomic import atomic_write_text
from lmforge.data.corpus import load_corpus, stdlib_source_files
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, generate

DEMO_MODEL = {
    "arch": "decoder", "n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 128,
    "position": "rope", "activation": "gelu", "tokenizer": "bpe", "vocab_size": 2048,
}
DEMO_TRAIN = {
    "batch_size": 16, "lr": 2e-3, "warmup_steps": 30, "eval_batches": 20, "save_every": 100_000,
    "max_steps": 100_000,  # replaced once a step has been timed
}
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n"]
CALIBRATION_STEPS = 4


def _clear_previous_demo(out: Path) -> None:
    """Re-running the demo starts over, but only a folder a demo wrote is ever removed."""
    marker = out / "run.json"
    if not out.exists():
        return
    try:
        is_demo = json.loads(marker.read_text()).get("data") == ["<python stdlib>"]
    except (OSError, ValueError):
        is_demo = False
    if not is_demo and any(out.iterdir()):
        raise LmforgeError(f"{out} exists and is not a demo run; choose another --out")
    shutil.rmtree(out)


def run_demo(minutes: float = 3.0, out: str | Path = "runs/demo") -> int:
    from lmforge.train.pretrain import prepare_run

    if minutes <= 0:
        raise LmforgeError(f"--minutes must be positive; got {minutes}")
    out = Path(out)
    _clear_previous_demo(out)
    started = time.perf_counter()
    files = stdlib_source_files()
    documents, stats = load_corpus(files)
    print(f"corpus: the Python standard library's source, {stats.summary()}")
    run = prepare_run({**DEMO_MODEL, **DEMO_TRAIN, "out": str(out)}, documents, stats.summary())
    atomic_write_text(out / "run.json", json.dumps({"data": ["<python stdlib>"]}) + "\n")
    trainer, model = run.trainer, run.model
    print(
        f"tokens: {len(trainer.train_store):,} train / {len(trainer.val_store):,} held out "
        f"(BPE, {run.tokenizer.vocab_size} tokens, prepared in {time.perf_counter() - started:.0f} s)"
    )
    print(f"model: GPT-style decoder, {model.num_parameters() / 1e6:.2f}M parameters")

    kernels.available()  # a first build of the CPU kernels (~40 s) must not count as training time
    tick = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step()
    per_step = (time.perf_counter() - tick) / CALIBRATION_STEPS
    budget = minutes * 60 - (time.perf_counter() - tick)
    steps = max(CALIBRATION_STEPS + 10, int(budget / (per_step * 1.1)))  # ~10% for evaluation
    trainer.config.max_steps = steps
    trainer.config.eval_every = max(10, steps // 6)
    print(f"training {steps} steps (~{per_step * 1000:.0f} ms each) for about {minutes:g} minutes")
    summary = trainer.fit()

    final = trainer.evaluate(max_batches=100)  # ~50k tokens: quick, and close to the full figure
    print(f"\nheld-out perplexity: {final['perplexity']:.2f} (loss {final['loss']:.3f}, "
          f"{summary['step']} steps, {summary['seconds']:.0f} s)")
    config = GenerationConfig(max_new_tokens=60, temperature=0.7, top_k=40, seed=0, stop=["\n\n\n"])
    completions = generate(model, run.tokenizer, PROMPTS, config)
    for number, (prompt, completion) in enumerate(zip(PROMPTS, completions, strict=True), 1):
        print(f"\n--- sample {number}: the prompt, then what the model wrote ---\n{prompt}{completion}")
    print(f"\nmodel folder: {out}\ntry:  lmforge generate {out} --prompt 'def main():' --stream")
    print(f"      lmforge eval {out} --data <python files>")
    return 0
