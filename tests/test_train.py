"""The training loop and its checkpoints: schedule, optimizer groups, learning, gradient
accumulation, determinism, exact resume, crash safety, atomic files, the non-finite guard,
torch.compile fallback, bf16, the MLM and denoising objectives, prepare_run and evaluation.

Every run is a 1-2 layer, n_embd 32 model on a few KB of repetitive text (see helpers.py).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (  # noqa: F401  (fixtures are registered by import)
    ENGLISH,
    TINYSHAKESPEARE,
    assert_same_weights,
    one_thread,
    read_metrics,
    snapshot,
    tiny_options,
    token_cache,
    write_corpus,
)

from lmforge import model_folder
from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.collate import WindowSampler, eval_windows
from lmforge.errors import LmforgeError
from lmforge.evaluate.perplexity import evaluate_store
from lmforge.model import LanguageModel
from lmforge.model_folder import load_model, save_model
from lmforge.train import checkpoint
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.objectives import Objective
from lmforge.train.pretrain import prepare_run
from lmforge.train.trainer import configure_optimizer, lr_at

REPO = Path(__file__).resolve().parents[1]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, "train")]


# --------------------------------------------------------------------------- learning-rate schedule


def test_lr_schedule_warmup_peak_cosine_floor():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, config) for s in range(config.max_steps + 1)]
    # linear warm-up: equal increments, all below the peak
    increments = [b - a for a, b in zip(lrs[:10], lrs[1:11], strict=True)]
    assert all(math.isclose(d, increments[0], rel_tol=1e-9) for d in increments)
    assert all(lr < config.lr for lr in lrs[:10])
    assert lrs[0] > 0
    # peak exactly at the end of warm-up
    assert lrs[10] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    # cosine: half-way between peak and floor at the middle of the decay, floor at max_steps
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)
    assert lrs[110] == pytest.approx(1e-4)
    assert lr_at(10_000, config) == pytest.approx(1e-4)  # stays at the floor past max_steps
    # monotone non-increasing after warm-up, strictly decreasing inside the decay
    after = lrs[10:]
    assert all(b < a for a, b in zip(after, after[1:], strict=False))


def test_lr_floor_defaults_to_a_tenth_and_no_warmup_starts_at_peak():
    config = TrainConfig(lr=2e-3, warmup_steps=0, max_steps=50)
    assert config.lr_floor == pytest.approx(2e-4)
    assert lr_at(0, config) == pytest.approx(2e-3)
    assert lr_at(50, config) == pytest.approx(2e-4)


def test_trainer_uses_the_schedule(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=12, warmup_steps=4, log_every=1))
    run.trainer.fit()
    logged = [r["lr"] for r in read_metrics(tmp_path / "run", "train")]
    assert logged == pytest.approx([lr_at(s, run.trainer.config) for s in range(12)])


# --------------------------------------------------------------------------- optimizer groups


def _group_of(optimizer) -> dict[int, float]:
    where: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in where, "a parameter is in two groups"
            where[id(p)] = group["weight_decay"]
    return where


@pytest.mark.parametrize(
    "overrides",
    [
        dict(arch="decoder", position="learned", tie_embeddings=True),
        dict(arch="decoder", position="relative", tie_embeddings=False, norm="rmsnorm"),
        dict(arch="encoder", position="learned", type_vocab_size=2, embedding_norm=True),
        dict(arch="encoder-decoder", position="sinusoidal", dense_connections=True, n_layer=2),
    ],
)
def test_optimizer_decays_only_linear_weights(overrides):
    torch.manual_seed(0)
    shape = dict(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = LanguageModel(ModelConfig(**{**shape, **overrides}))
    optimizer = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    where = _group_of(optimizer)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embedding_weights
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(where) == trainable  # every trainable parameter in exactly one group
    for name, p in model.named_parameters():
        expected = 0.1 if id(p) in linear_weights else 0.0
        assert where[id(p)] == expected, f"{name}: weight decay {where[id(p)]}, expected {expected}"
    assert any(wd == 0.1 for wd in where.values()) and any(wd == 0.0 for wd in where.values())
    if overrides.get("tie_embeddings", True) and overrides["arch"] != "encoder":
        assert model.head.proj.weight is model.token_embedding.weight
        assert where[id(model.head.proj.weight)] == 0.0  # the tied head is an embedding: no decay
    if overrides.get("tie_embeddings") is False:
        assert where[id(model.head.proj.weight)] == 0.1  # an untied head is an ordinary matrix


# --------------------------------------------------------------------------- learning


def test_loss_falls_on_repetitive_text(tmp_path):
    run = prepare_run(tiny_options(tmp_path, block_size=32, batch_size=8, lr=1e-2, max_steps=60, eval_every=30))
    before = run.trainer.evaluate()["loss"]
    assert before == pytest.approx(math.log(run.tokenizer.vocab_size), rel=0.1)  # untrained ≈ uniform
    summary = run.trainer.fit()
    after = summary["val"]["loss"]
    assert summary["step"] == 60 and summary["skipped_steps"] == 0
    assert after < 0.7 * before, (before, after)
    val = read_metrics(tmp_path / "run", "val")
    assert [r["step"] for r in val] == [30, 60]
    assert val[1]["loss"] < val[0]["loss"]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run", "train"))


# --------------------------------------------------------------------------- gradient accumulation


def _feed(trainer, batches: list) -> list:
    """Make the trainer's sampler hand out exactly `batches`; returns the list of calls."""
    calls: list[int] = []
    queue = list(batches)

    def next_batch():
        calls.append(1)
        return queue.pop(0)

    trainer.sampler.next_batch = next_batch
    return calls


def _record_grads(trainer) -> list[dict]:
    """Capture the gradients the optimizer is about to apply, at every step."""
    seen: list[dict] = []
    real = trainer.optimizer.step

    def step(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


def test_grad_accum_equals_one_big_batch(tmp_path):
    """batch 4 x grad_accum 2 on the same 8 windows gives the gradient (and update) of batch 8."""
    big = prepare_run(tiny_options(tmp_path, out="big", batch_size=8, grad_accum=1, warmup_steps=0))
    small = prepare_run(tiny_options(tmp_path, out="small", batch_size=4, grad_accum=2, warmup_steps=0))
    initial = snapshot(big.model)
    assert_same_weights(initial, snapshot(small.model))  # same seed, same initial weights
    draw = WindowSampler(big.trainer.train_store, 16, 8, seed=123)
    batches = [draw.next_batch() for _ in range(3)]
    _feed(big.trainer, batches)
    _feed(small.trainer, [(x[half], y[half]) for x, y in batches for half in (slice(0, 4), slice(4, 8))])
    big_grads, small_grads = _record_grads(big.trainer), _record_grads(small.trainer)
    for _ in range(3):
        a, b = big.trainer.train_step(), small.trainer.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert len(big_grads) == len(small_grads) == 3
    for g_big, g_small in zip(big_grads, small_grads, strict=True):
        assert g_big.keys() == g_small.keys()
        for name in g_big:
            torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-6, msg=name)
    # Adam divides by sqrt(v): on parameters whose true gradient is 0 (attention key biases)
    # rounding noise is amplified, so weights agree to 1e-5 rather than to the last bit.
    assert_same_weights(snapshot(big.model), snapshot(small.model), atol=1e-5)
    assert not torch.equal(big.model.token_embedding.weight, initial["token_embedding.weight"])  # it did train


def test_grad_accum_draws_one_batch_per_micro_step(tmp_path):
    run = prepare_run(tiny_options(tmp_path, batch_size=4, grad_accum=3))
    real = run.trainer.sampler.next_batch
    calls: list[int] = []

    def counting():
        calls.append(1)
        return real()

    run.trainer.sampler.next_batch = counting
    for _ in range(2):
        result = run.trainer.train_step()
        assert math.isfinite(result["loss"]) and not result["skipped"]
    assert len(calls) == 6
    assert run.trainer.tokens_per_step == 4 * 3 * 16


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_bit_identical_runs(tmp_path):
    a = prepare_run(tiny_options(tmp_path, out="a", max_steps=15))
    a.trainer.fit()
    b = prepare_run(tiny_options(tmp_path, out="b", max_steps=15))
    b.trainer.fit()
    c = prepare_run(tiny_options(tmp_path, out="c", max_steps=15, seed=8))
    c.trainer.fit()
    assert len(train_losses(tmp_path / "a")) == 15
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert_same_weights(snapshot(a.model), snapshot(b.model))
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "c")
    # the saved model files hold identical tensors too
    assert_same_weights(snapshot(load_model(tmp_path / "a")[0]), snapshot(load_model(tmp_path / "b")[0]))


# --------------------------------------------------------------------------- resume


RESUME = dict(max_steps=20, save_every=10, eval_every=10, log_every=1)


def test_resume_continues_exactly(tmp_path):
    a = prepare_run(tiny_options(tmp_path, out="a", **RESUME))
    a.trainer.fit()

    b = prepare_run(tiny_options(tmp_path, out="b", **RESUME))
    assert b.resumed is False
    b.trainer.fit(until=10)
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-00000010"]
    del b

    # a new process would know nothing but the folder
    b2 = prepare_run({"out": str(tmp_path / "b"), "resume": True})
    assert b2.resumed is True and b2.trainer.step == 10
    b2.trainer.fit()
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert [r["step"] for r in read_metrics(tmp_path / "b", "train")] == list(range(1, 21))
    assert read_metrics(tmp_path / "b", "val") == read_metrics(tmp_path / "a", "val")
    assert_same_weights(snapshot(b2.model), snapshot(a.model))


def test_resume_of_a_checkpointed_run_keeps_its_tokenizer_without_run_json(tmp_path):
    """run.json marks a prepared folder, but a checkpoint alone is enough to resume from: the
    tokenizer is the folder's, not one retrained on whatever text is given now."""
    a = prepare_run(tiny_options(tmp_path, out="a", **RESUME))
    a.trainer.fit(until=10)
    (tmp_path / "a" / "run.json").unlink()
    other = write_corpus(tmp_path / "other", ENGLISH + "Zebras yodel, quixotically.\n")
    b = prepare_run({**tiny_options(tmp_path, out="a", **RESUME), "data": [str(other)], "resume": True})
    assert b.resumed and b.trainer.step == 10
    assert b.tokenizer.vocab_size == a.tokenizer.vocab_size


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    a = prepare_run(tiny_options(tmp_path, out="a", **RESUME))
    a.trainer.fit()

    crashed = prepare_run(tiny_options(tmp_path, out="c", **RESUME))
    real_step = crashed.trainer.train_step

    def dies_at_15():
        if crashed.trainer.step == 14:
            raise KeyboardInterrupt  # the process dies after logging step 14
        return real_step()

    crashed.trainer.train_step = dies_at_15
    with pytest.raises(KeyboardInterrupt):
        crashed.trainer.fit()
    assert max(r["step"] for r in read_metrics(tmp_path / "c")) == 14

    again = prepare_run(tiny_options(tmp_path, out="c", resume=True, **RESUME))
    assert again.resumed and again.trainer.step == 10
    assert max(r["step"] for r in read_metrics(tmp_path / "c")) == 10  # 11..14 forgotten
    again.trainer.fit()
    steps = [r["step"] for r in read_metrics(tmp_path / "c", "train")]
    assert steps == list(range(1, 21))  # no duplicates
    assert train_losses(tmp_path / "c") == train_losses(tmp_path / "a")
    assert_same_weights(snapshot(again.model), snapshot(a.model))


@pytest.mark.parametrize("resume", [False, True])
def test_rerun_after_crash_before_first_checkpoint_drops_stale_metrics(tmp_path, resume):
    """A run killed before its first checkpoint leaves metrics.jsonl but nothing to resume from:
    starting it again (with or without --resume) must not mix the dead run's lines into the new
    run's log (each step once)."""
    options = tiny_options(tmp_path, max_steps=8, save_every=100, log_every=1)
    dead = prepare_run(options)
    real_step = dead.trainer.train_step

    def dies_at_6():
        if dead.trainer.step == 5:
            raise KeyboardInterrupt
        return real_step()

    dead.trainer.train_step = dies_at_6
    with pytest.raises(KeyboardInterrupt):
        dead.trainer.fit()
    assert not checkpoint_dirs(tmp_path / "run")
    assert len(read_metrics(tmp_path / "run", "train")) == 5

    try:
        run = prepare_run({**options, "resume": resume})
    except LmforgeError:
        if resume:
            raise
        return  # refusing to start over in a used folder would be fine too
    assert run.resumed is False
    run.trainer.fit()
    steps = [r["step"] for r in read_metrics(tmp_path / "run", "train")]
    assert steps == list(range(1, 9)), steps


# --------------------------------------------------------------------------- crash safety


def test_leftovers_of_a_killed_save_do_not_break_load_or_resume(tmp_path):
    options = tiny_options(tmp_path, max_steps=10, save_every=5)
    run = prepare_run(options)
    run.trainer.fit()
    saved = snapshot(run.model)
    out = tmp_path / "run"
    # A save of step 15 killed half-way: its temporary folder holds a torn model file and no
    # trainer state; an atomic write of the top-level model was killed mid-file too.
    torn = out / "checkpoints" / ".tmp-step-00000015-x1y2z3"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100])
    (out / ".model.safetensors.abc123.tmp").write_bytes(b"\x00" * 10)
    (out / "checkpoints" / "step-00000010" / ".trainer_state.pt.q9.tmp").write_bytes(b"garbage")

    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000005", "step-00000010"]
    model, tokenizer = load_model(out)
    assert_same_weights(snapshot(model), saved)
    assert tokenizer.vocab_size == run.tokenizer.vocab_size

    resumed = prepare_run({**options, "resume": True, "max_steps": 15})
    assert resumed.resumed and resumed.trainer.step == 10
    assert_same_weights(snapshot(resumed.model), saved)
    resumed.trainer.fit()
    assert resumed.trainer.step == 15
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000010", "step-00000015"]
    assert not torn.exists()  # the next complete save clears the dead one's folder
    load_model(out)


def _newest_step(out: Path) -> int:
    found = checkpoint_dirs(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def test_kill_while_pruning_an_old_checkpoint(tmp_path, monkeypatch):
    """checkpoint_dirs promises complete checkpoints only. A run killed while it deletes an old
    checkpoint (keep_checkpoints) must not leave a half-deleted step-N folder that still
    counts as a checkpoint."""
    cache = os.environ["LMFORGE_CACHE_DIR"]
    run = prepare_run(tiny_options(tmp_path, max_steps=4, save_every=2, keep_checkpoints=1))
    run.trainer.fit(until=2)
    real_rmtree = checkpoint.shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        path = Path(path)
        if (path / "tokenizer.json").is_file():  # deleting a checkpoint folder:
            (path / "tokenizer.json").unlink()  # the first file is gone...
            raise KeyboardInterrupt  # ...when the process dies
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.shutil, "rmtree", dies_half_way)
        try:
            run.trainer.fit()  # saves step 4, then prunes step 2
        except KeyboardInterrupt:
            pass
    assert os.environ["LMFORGE_CACHE_DIR"] == cache  # still the test's private cache
    for found in checkpoint_dirs(tmp_path / "run"):
        load_model(found)  # every listed checkpoint is whole
        assert (found / "trainer_state.pt").is_file()
    resumed = prepare_run(tiny_options(tmp_path, max_steps=4, resume=True))
    assert resumed.trainer.step == 4


@pytest.mark.slow
def test_sigkill_during_pretrain_then_resume(tmp_path):
    """Kill a real `lmforge pretrain` (then two `--resume`s of it) with SIGKILL while it saves a
    checkpoint every 3 steps; the folder must always load and a final --resume must finish."""
    corpus = write_corpus(tmp_path, ENGLISH * 3)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = [
        "pretrain", "--data", str(corpus), "--tokenizer", "char", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--save-every", "3",
        "--eval-every", "100000", "--no-progress",
    ]
    for round_ in range(3):
        argv = first if round_ == 0 else ["pretrain", "--resume"]
        before = _newest_step(out)
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", *argv, "--max-steps", "100000", "--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 120
            while _newest_step(out) <= before:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no new checkpoint after 120 s"
                time.sleep(0.02)
            time.sleep(0.5 + 0.37 * round_)  # a few more saves: the kill may well land inside one
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        top = snapshot(load_model(out)[0])  # the top level is always a complete model...
        found = checkpoint_dirs(out)
        newest = snapshot(load_model(found[-1])[0])  # ...and so is the newest checkpoint
        assert (found[-1] / "trainer_state.pt").is_file()
        if not all(torch.equal(top[k], newest[k]) for k in top):
            # the kill fell between a checkpoint's rename and the refresh of the top-level files:
            # the top level is then the previous checkpoint's model
            assert_same_weights(top, snapshot(load_model(found[-2])[0]))

    from lmforge.cli import main

    step = _newest_step(out)
    assert main(["pretrain", "--resume", "--out", str(out), "--max-steps", str(step + 6)]) == 0
    assert _newest_step(out) == step + 6
    steps = [r["step"] for r in read_metrics(out, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == step + 6
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    load_model(out)


# --------------------------------------------------------------------------- atomic files


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second version")
    assert path.read_text() == "second version"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]
    mode = path.stat().st_mode & 0o777
    assert mode != 0o600
    assert mode == 0o666 & ~current_umask()


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, 12345)  # the write itself fails half-way
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_checkpoints_modes_pruning_and_top_level_model(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=20, save_every=5, keep_checkpoints=2))
    run.trainer.fit()
    out = tmp_path / "run"
    dirs = checkpoint_dirs(out)
    assert [p.name for p in dirs] == ["step-00000015", "step-00000020"]
    umask = current_umask()
    assert dirs[-1].stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (dirs[-1] / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    for name in model_folder.MODEL_FILES:
        assert (out / name).read_bytes() == (dirs[-1] / name).read_bytes()
    state = checkpoint.load_trainer_state(dirs[-1])
    assert state["step"] == 20 and state["train_config"]["max_steps"] == 20
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    model, _ = load_model(out)
    assert_same_weights(snapshot(model), snapshot(run.model))
    assert model.head.proj.weight is model.token_embedding.weight  # tie restored on load


def test_save_model_load_model_round_trip_untied(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                      tie_embeddings=False))
    from lmforge.tokenize import Tokenizer

    tokenizer = Tokenizer.train("char", ["abcdefghijklmnopqrstuvwxyz"])
    save_model(model, tmp_path / "m", tokenizer)
    loaded, tok = load_model(tmp_path / "m")
    assert_same_weights(snapshot(loaded), snapshot(model))
    assert loaded.head.proj.weight is not loaded.token_embedding.weight
    assert tok.encode("abc") == tokenizer.encode("abc")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LmforgeError, match="cannot read"):
        load_model(tmp_path / "m")
    with pytest.raises(LmforgeError, match="not found"):
        load_model(tmp_path / "missing")


# --------------------------------------------------------------------------- non-finite guard


def _nan_on(trainer, steps: set[int] | None = None, from_step: int | None = None) -> None:
    """Make the loss NaN on the given (1-based) steps."""
    real = trainer.forward

    def forward(**batch):
        out = real(**batch)
        step = trainer.step + 1  # the step being computed
        if (steps and step in steps) or (from_step is not None and step >= from_step):
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = forward


def test_non_finite_step_is_skipped_counted_and_training_continues(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=12, log_every=1))
    trainer = run.trainer
    trainer.fit(until=5)
    _nan_on(trainer, steps={6})
    before = snapshot(run.model)
    adam_state = {k: v["exp_avg"].clone() for k, v in enumerate(trainer.optimizer.state.values())}
    result = trainer.train_step()
    assert result["skipped"] is True and math.isnan(result["loss"])
    assert trainer.step == 6 and trainer.bad_steps == 1
    assert_same_weights(snapshot(run.model), before)  # no update at all
    after_state = {k: v["exp_avg"] for k, v in enumerate(trainer.optimizer.state.values())}
    assert all(torch.equal(adam_state[k], after_state[k]) for k in adam_state)
    assert all(p.grad is None for p in run.model.parameters())
    summary = trainer.fit()
    assert summary["step"] == 12 and summary["skipped_steps"] == 1
    records = read_metrics(tmp_path / "run", "train")
    assert records[-1]["skipped_total"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] > 6)
    state = checkpoint.load_trainer_state(checkpoint_dirs(tmp_path / "run")[-1])
    assert state["bad_steps"] == 1


def test_skipped_step_is_not_logged_as_a_zero_loss(tmp_path):
    """With log_every=1, the metrics line of a skipped step must not claim a loss of 0.0."""
    run = prepare_run(tiny_options(tmp_path, max_steps=4, log_every=1))
    _nan_on(run.trainer, steps={2})
    run.trainer.fit()
    record = next(r for r in read_metrics(tmp_path / "run", "train") if r["step"] == 2)
    assert record["skipped_total"] == 1
    assert record["loss"] is None, record  # JSON null: no loss to report, and still strict JSON


def test_too_many_bad_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=40, save_every=5, max_bad_steps=3))
    trainer = run.trainer
    trainer.fit(until=5)
    good = snapshot(run.model)
    trainer.train_step()  # step 6 is good: memory now differs from the checkpoint
    _nan_on(trainer, from_step=7)
    with pytest.raises(LmforgeError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "\n" not in message
    assert "3 non-finite steps" in message
    assert str(tmp_path / "run") in message
    assert trainer.step == 9
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000005"]
    model, _ = load_model(tmp_path / "run")
    assert_same_weights(snapshot(model), good)


def test_bad_steps_in_a_row_reset_by_a_good_step(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=10, max_bad_steps=2))
    _nan_on(run.trainer, steps={2, 4, 6, 8})  # never two in a row
    summary = run.trainer.fit()
    assert summary["step"] == 10 and summary["skipped_steps"] == 4


# --------------------------------------------------------------------------- compile and bf16


def test_compile_unavailable_falls_back_to_eager(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        run = prepare_run(tiny_options(tmp_path, compile=True, max_steps=5))
    assert run.trainer.forward is run.model
    summary = run.trainer.fit()
    assert summary["step"] == 5 and summary["skipped_steps"] == 0


def test_compiled_forward_failing_at_first_call_falls_back(tmp_path, monkeypatch):
    calls = []

    def compile_that_fails_later(model, *args, **kwargs):
        def compiled(**batch):
            calls.append(1)
            raise RuntimeError("inductor exploded")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails_later)
    run = prepare_run(tiny_options(tmp_path, compile=True, max_steps=5))
    assert run.trainer.forward is not run.model
    with pytest.warns(UserWarning, match="torch.compile failed"):
        first = run.trainer.train_step()
    assert math.isfinite(first["loss"]) and not first["skipped"]
    assert run.trainer.forward is run.model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        summary = run.trainer.fit()
    assert summary["step"] == 5 and calls == [1]


def test_bf16_autocast_step(tmp_path):
    run = prepare_run(tiny_options(tmp_path, bf16=True, max_steps=2))
    dtypes = []
    qkv = run.model.decoder.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    result = run.trainer.train_step()
    assert not result["skipped"] and math.isfinite(result["loss"]) and result["loss"] > 0
    assert dtypes == [torch.bfloat16]  # the flag really turns autocast on
    assert run.model.token_embedding.weight.dtype == torch.float32  # master weights stay fp32


def test_bf16_defaults_to_what_the_hardware_has(tmp_path, monkeypatch):
    """Left unset, bf16 follows the processor: off without bf16 matrix units, on with them. Both
    answers are faked, so both branches run on every machine."""
    from lmforge import hardware

    monkeypatch.delenv(hardware.BF16_OVERRIDE, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not hardware.bf16_native(torch.device("cpu"))
    assert prepare_run(tiny_options(tmp_path / "a", max_steps=2, bf16=None)).trainer.bf16 is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert prepare_run(tiny_options(tmp_path / "b", max_steps=2, bf16=None)).trainer.bf16 is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert hardware.bf16_native(torch.device("cpu"))
    assert prepare_run(tiny_options(tmp_path / "c", max_steps=2, bf16=False)).trainer.bf16 is False


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("0", False), ("false", False)])
def test_bf16_detection_is_overridden_by_the_environment(monkeypatch, value, expected):
    """LMFORGE_CPU_BF16 forces the answer whatever the CPU says: how the suite runs the other branch."""
    from lmforge import hardware

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not expected)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not expected)
    monkeypatch.setenv(hardware.BF16_OVERRIDE, value)
    assert hardware.bf16_native(torch.device("cpu")) is expected
    monkeypatch.setenv(hardware.BF16_OVERRIDE, "maybe")
    with pytest.raises(LmforgeError, match="LMFORGE_CPU_BF16 must be 1, 0 or auto; got 'maybe'"):
        hardware.bf16_native(torch.device("cpu"))


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_activation_checkpointing_recomputes_blocks_with_identical_gradients(arch, tmp_path, monkeypatch):
    """Checkpointed blocks run forward twice (once more in backward) and give the same gradients."""
    from lmforge.model import layers

    grads, calls, counter = {}, {}, [0]
    real_forward = layers.FeedForward.forward

    def counting_forward(self, x):  # module hooks do not fire on recomputation; the method does
        counter[0] += 1
        return real_forward(self, x)

    monkeypatch.setattr(layers.FeedForward, "forward", counting_forward)
    for flag in (False, True):
        run = prepare_run(tiny_options(tmp_path / str(flag), arch=arch, activation_checkpointing=flag))
        counter[0] = 0
        x, y = run.trainer.sampler.next_batch()
        batch = run.trainer.objective.batch(x, y, torch.Generator().manual_seed(0))
        run.model.train()
        run.model(**batch).loss.backward()
        grads[flag] = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
        calls[flag] = counter[0]
    blocks = run.model.n_blocks
    assert calls == {False: blocks, True: 2 * blocks}
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointed_rotary_blocks_compile_into_one_graph():
    """Activation checkpointing under torch.compile: one graph (fullgraph=True raises at a graph
    break; rotary tables looked up inside a checkpointed block used to cause one per block) and
    the eager gradients."""
    from lmforge.config import ModelConfig
    from lmforge.model import LanguageModel

    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                          n_embd=32, position="rope")).train()
        model.decoder.checkpoint_blocks = True
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        run(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    want = grads(compiled=False)
    torch._dynamo.reset()
    try:
        got = grads(compiled=True)
    finally:
        torch._dynamo.reset()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- other objectives


@pytest.mark.parametrize(
    ("arch", "objective", "steps", "ratio"),
    [("encoder", "mlm", 200, 0.88), ("encoder-decoder", "denoise", 100, 0.7)],
)
def test_encoder_objectives_learn(tmp_path, arch, objective, steps, ratio):
    run = prepare_run(tiny_options(
        tmp_path, arch=arch, position="rope", block_size=32, batch_size=8, lr=5e-3, mask_prob=0.3,
        max_steps=steps, eval_batches=8,
    ))
    assert run.trainer.objective.name == objective
    assert run.model.config.mask_token_id == run.tokenizer.mask_id is not None
    before = run.trainer.evaluate()["loss"]
    run.trainer.fit()
    after = run.trainer.evaluate()["loss"]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run", "train")]
    assert all(math.isfinite(x) for x in losses)
    assert math.isfinite(before) and after < ratio * before, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_objective_must_fit_the_arch(tmp_path):
    with pytest.raises(LmforgeError, match="does not fit arch"):
        prepare_run(tiny_options(tmp_path, arch="encoder", objective="clm"))


# --------------------------------------------------------------------------- prepare_run errors


def test_prepare_run_refuses_an_existing_run_without_resume(tmp_path):
    options = tiny_options(tmp_path, max_steps=3)
    prepare_run(options).trainer.fit()
    with pytest.raises(LmforgeError, match="already holds a training run") as caught:
        prepare_run(options)
    assert "--resume" in str(caught.value)


def test_prepare_run_too_short_corpus(tmp_path):
    write_corpus(tmp_path, "Hello there, world.\n")
    with pytest.raises(LmforgeError) as caught:
        prepare_run(tiny_options(tmp_path, block_size=32))
    message = str(caught.value)
    assert "\n" not in message
    assert "fewer than one context window" in message and "block_size" in message


def test_prepare_run_needs_out_and_data(tmp_path):
    with pytest.raises(LmforgeError, match="--out"):
        prepare_run({"data": [str(write_corpus(tmp_path))]})
    with pytest.raises(LmforgeError, match="--data"):
        prepare_run({"out": str(tmp_path / "run")})
    with pytest.raises(LmforgeError, match="unknown option"):
        prepare_run(tiny_options(tmp_path, n_layers=2))


# --------------------------------------------------------------------------- evaluation


def test_full_pass_evaluation_is_exact(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=10))
    run.trainer.fit()
    model, store = run.model, run.trainer.val_store
    objective = Objective("clm", model.config)
    result = evaluate_store(model, store, objective, batch_size=4)

    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_windows(store, 16, 4):
            logits = model(x).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
            count += int((y != -100).sum())
    assert result["tokens"] == count == len(store) - 1  # every token but the first scored once
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert store.n_bytes > 0
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / store.n_bytes, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / store.n_bytes, rel=1e-9
    )
    # the train and val splits share the corpus's bytes exactly
    assert run.trainer.train_store.n_bytes + store.n_bytes == len(ENGLISH.encode("utf-8"))
    # a partial pass is an estimate: no bits per byte, fewer tokens
    partial = evaluate_store(model, store, objective, batch_size=4, max_batches=1)
    assert "bits_per_byte" not in partial and partial["tokens"] <= 4 * 16
    # the batch size does not change a full pass
    other = evaluate_store(model, store, objective, batch_size=3)
    assert other["tokens"] == result["tokens"]
    assert other["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_evaluate_restores_training_mode(tmp_path):
    run = prepare_run(tiny_options(tmp_path))
    run.model.train()
    run.trainer.evaluate()
    assert run.model.training
    run.model.eval()
    run.trainer.evaluate()
    assert not run.model.training


def test_bpe_run_on_tinyshakespeare_accounts_for_every_byte(tmp_path):
    """Byte-level BPE on real text: the train/val cut falls inside the one document, yet the two
    splits' byte counts are exact, so bits per byte is exact too."""
    if not TINYSHAKESPEARE.is_file():
        pytest.skip(f"tiny shakespeare not found at {TINYSHAKESPEARE}")
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    corpus = write_corpus(tmp_path, text, "shakespeare.txt")
    run = prepare_run(tiny_options(tmp_path, data=[str(corpus)], tokenizer="bpe", vocab_size=400, block_size=32,
                                   max_steps=20, lr=5e-3))
    train, val = run.trainer.train_store, run.trainer.val_store
    assert train.n_bytes + val.n_bytes == len(text.encode("utf-8"))
    val_ids = [int(t) for t in val.tokens if int(t) != run.tokenizer.eos_id]
    assert val.n_bytes == len(run.tokenizer.decode(val_ids).encode("utf-8"))
    before = evaluate_store(run.model, val, run.trainer.objective, batch_size=8)
    run.trainer.fit()
    after = evaluate_store(run.model, val, run.trainer.objective, batch_size=8)
    for result in (before, after):
        assert result["bits_per_byte"] == pytest.approx(
            result["loss"] * result["tokens"] / math.log(2) / val.n_bytes, rel=1e-9
        )
    assert after["bits_per_byte"] < before["bits_per_byte"]
    assert after["bits_per_byte"] < 8  # better than storing the bytes raw


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_gradients_matches_clip_grad_norm(max_norm):
    """The same norm and the same clipped gradients as torch's clip_grad_norm_, whether the
    gradients need scaling (0.05) or not (1e6)."""
    from lmforge.train.trainer import clip_gradients

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    twin = LanguageModel(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    twin.load_state_dict(model.state_dict())
    x = torch.randint(0, 50, (3, 16))
    for m in (model, twin):
        m(x, labels=x).loss.backward()
    ours = clip_gradients(model.parameters(), max_norm)
    reference = float(torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm))
    assert ours == pytest.approx(reference, rel=1e-6) and ours > 0.05
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    after = clip_gradients(model.parameters(), float("inf"))
    assert after == pytest.approx(min(max_norm, reference), rel=1e-5)


def test_clip_gradients_leaves_non_finite_gradients_for_the_skip_guard():
    from lmforge.train.trainer import clip_gradients

    w = nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(clip_gradients([w], 1.0))
    assert w.grad[0] == 1.0 and w.grad[2] == 2.0  # not scaled by NaN: the step is skipped anyway
