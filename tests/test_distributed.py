"""Two processes on torch.distributed (gloo, CPU) must train exactly like one process with the
combined batch, and checkpoints must move freely between one process, DDP and FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TINY = ["--tokenizer", "char", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "3", "--seed", "0", "--no-progress",
        "--no-bf16"]  # exact comparisons: fp32 on every CPU


@pytest.fixture()
def corpus(tmp_path):
    text = SHAKESPEARE.read_text()[:30_000] if SHAKESPEARE.exists() else "the quick brown fox jumps. " * 1500
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    config = tmp_path / "log_every_step.yaml"
    config.write_text("log_every: 1\n")
    return path, config


def lmforge(*args: str, nproc: int = 1, cache: Path) -> None:
    """Run `lmforge` in fresh processes: one, or `nproc` ranks launched by torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "-m", "lmforge.cli", *args]
    env = {**os.environ, "LMFORGE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def train_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["split"] == "train"]


def assert_same_run(a: Path, b: Path) -> None:
    assert train_losses(a) == pytest.approx(train_losses(b), abs=1e-5)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_double_batch(tmp_path, corpus, sharding):
    """Per-rank batch B on 2 ranks (with gradient accumulation, so no_sync is exercised) gives the
    losses and weights of batch 2B in one process."""
    data, config = corpus
    common = ["--data", str(data), "--config", str(config), *TINY, "--max-steps", "6", "--grad-accum", "2"]
    lmforge("pretrain", *common, "--batch-size", "2", *sharding, "--out", str(tmp_path / "two"),
            nproc=2, cache=tmp_path / "cache")
    lmforge("pretrain", *common, "--batch-size", "4", "--out", str(tmp_path / "one"), cache=tmp_path / "cache")
    assert len(train_losses(tmp_path / "one")) == 6
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "two" / "checkpoints" / "step-00000006" / "trainer_state.pt").is_file()


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["ddp-then-single", "single-then-ddp"])
def test_checkpoints_cross_between_ddp_and_one_process(tmp_path, corpus, first, second):
    """A run checkpointed under one layout resumes under the other, matching a run that never
    changed layout (per-rank batch scaled so the global batch stays 4)."""
    data, config = corpus
    common = ["--data", str(data), "--config", str(config), *TINY]

    def run(out: str, nproc: int, *extra: str) -> None:
        lmforge("pretrain", *common, "--batch-size", str(4 // nproc), *extra, "--out", str(tmp_path / out),
                nproc=nproc, cache=tmp_path / "cache")

    run("mixed", first, "--max-steps", "3")
    run("mixed", second, "--max-steps", "6", "--resume")
    run("plain", 1, "--max-steps", "3")
    run("plain", 1, "--max-steps", "6", "--resume")
    assert len(train_losses(tmp_path / "mixed")) == 6
    assert_same_run(tmp_path / "mixed", tmp_path / "plain")


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_finetune_two_ranks_equal_one_process_with_double_batch(tmp_path, corpus, sharding):
    """`lmforge finetune` runs under torchrun unchanged: from the same start model, 2 ranks with
    batch B train like one process with batch 2B, and both really start from that model."""
    data, config = corpus
    cache = tmp_path / "cache"
    lmforge("pretrain", "--data", str(data), "--config", str(config), *TINY, "--max-steps", "40",
            "--batch-size", "4", "--out", str(tmp_path / "base"), cache=cache)
    common = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--config", str(config),
              "--seq-len", "16", "--max-steps", "6", "--grad-accum", "2", "--eval-every", "3", "--seed", "0",
              "--no-progress", "--no-bf16"]
    lmforge(*common, "--batch-size", "2", *sharding, "--out", str(tmp_path / "two"), nproc=2, cache=cache)
    lmforge(*common, "--batch-size", "4", "--out", str(tmp_path / "one"), cache=cache)
    assert len(train_losses(tmp_path / "one")) == 6
    assert_same_run(tmp_path / "two", tmp_path / "one")
    base_losses = train_losses(tmp_path / "base")
    assert train_losses(tmp_path / "two")[0] < base_losses[0] - 0.5, (base_losses[0], base_losses[-1])
