"""What the trainer promises, each pinned so that a plausible bug breaks a default test:

- resume is exact for every objective with dropout on (torch's RNG and the masking generator
  are restored, not only the weights, optimizer and sampler);
- train_step really clips: the optimizer sees gradients of norm grad_clip, and reports the norm
  before clipping;
- the masked-LM objective the trainer builds never selects the tokenizer's special tokens, and
  selects about mask_prob of the others;
- a save that fails part-way never leaves a step-N folder that is listed, loaded or resumed from;
- with gradient accumulation the update uses the mean of the micro-batch gradients.

Every run is fp32 (tiny_options pins bf16=False): the comparisons are exact or to rounding.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401  (fixtures are registered by import)
    assert_same_weights,
    one_thread,
    read_metrics,
    snapshot,
    tiny_options,
    token_cache,
)

from lmforge import atomic
from lmforge.data.collate import IGNORE_INDEX, WindowSampler
from lmforge.model_folder import load_model
from lmforge.train import checkpoint
from lmforge.train import trainer as trainer_module
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.pretrain import prepare_run

OBJECTIVE_OF_ARCH = {"decoder": "clm", "encoder": "mlm", "encoder-decoder": "denoise"}


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, "train")]


def finish_by_resuming(out: Path, **overrides):
    """A fresh process's view of the run: nothing but the folder (and any overrides)."""
    run = prepare_run({"out": str(out), "resume": True, **overrides})
    assert run.resumed
    run.trainer.fit()
    return run


def assert_runs_identical(run_dir: Path, reference_dir: Path, model, reference_model) -> None:
    assert train_losses(run_dir) == train_losses(reference_dir)
    assert read_metrics(run_dir, "val") == read_metrics(reference_dir, "val")
    assert_same_weights(snapshot(model), snapshot(reference_model))


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))


def record_gradients_at_optimizer_step(trainer) -> list[dict]:
    """The gradients exactly as the optimizer applies them, one dict per step."""
    seen: list[dict] = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        seen.append(gradients(trainer.model))
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("arch", list(OBJECTIVE_OF_ARCH))
def test_resume_with_dropout_is_exact_for_every_objective(tmp_path, arch):
    """Dropout draws from torch's global RNG and mlm/denoise masks from the trainer's generator:
    unless resume restores both, the continued run sees other masks than the uninterrupted one."""
    options = dict(arch=arch, dropout=0.2, attn_dropout=0.2, max_steps=6, save_every=3, log_every=1)
    whole = prepare_run(tiny_options(tmp_path, out="whole", **options))
    assert whole.trainer.objective.name == OBJECTIVE_OF_ARCH[arch] and whole.model.config.dropout == 0.2
    whole.trainer.fit()

    interrupted = prepare_run(tiny_options(tmp_path, out="interrupted", **options))
    interrupted.trainer.fit(until=3)
    del interrupted
    resumed = finish_by_resuming(tmp_path / "interrupted")
    assert [r["step"] for r in read_metrics(tmp_path / "interrupted", "train")] == list(range(1, 7))
    assert_runs_identical(tmp_path / "interrupted", tmp_path / "whole", resumed.model, whole.model)


# --------------------------------------------------------------------------- clipping


def first_step_gradients(tmp_path, grad_clip: float) -> tuple[dict, dict]:
    """(train_step's result, gradients the optimizer applied) for the first step of a fresh run."""
    run = prepare_run(tiny_options(tmp_path, out=f"clip-{grad_clip}", grad_clip=grad_clip))
    applied = record_gradients_at_optimizer_step(run.trainer)
    result = run.trainer.train_step()
    assert not result["skipped"] and len(applied) == 1
    return result, applied[0]


def test_train_step_applies_clipped_gradients_and_reports_the_norm_before_clipping(tmp_path):
    """Adam barely notices a uniformly scaled gradient, so the weights alone would not show a
    trainer that forgot to clip: look at the gradients the optimizer is handed instead."""
    clip = 0.01
    free, free_grads = first_step_gradients(tmp_path, grad_clip=0)  # the same run, never clipped
    clipped, clipped_grads = first_step_gradients(tmp_path, grad_clip=clip)
    assert global_norm(free_grads) == pytest.approx(free["grad_norm"], rel=1e-5)
    assert free["grad_norm"] > 10 * clip  # this step really needs clipping
    assert clipped["grad_norm"] == pytest.approx(free["grad_norm"], rel=1e-6)  # the norm before clipping
    assert global_norm(clipped_grads) == pytest.approx(clip, rel=1e-4)
    scale = clip / free["grad_norm"]
    assert clipped_grads.keys() == free_grads.keys()
    for name, grad in free_grads.items():  # scaled as a whole: same direction, every tensor alike
        torch.testing.assert_close(clipped_grads[name], grad * scale, rtol=1e-4, atol=1e-9, msg=name)


# --------------------------------------------------------------------------- masked LM special tokens


def with_special_tokens(x: torch.Tensor, special_ids: list[int], generator: torch.Generator) -> torch.Tensor:
    """Real text with a third of its positions (and all of row 0) replaced by special ids."""
    special = torch.tensor(special_ids)
    picks = special[torch.randint(len(special_ids), x.shape, generator=generator)]
    where = torch.rand(x.shape, generator=generator) < 1 / 3
    where[0] = True  # a row with nothing to mask: it must stay unselected, not get a forced pick
    return torch.where(where, picks, x)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_mlm_objective_never_selects_the_tokenizers_special_tokens(tmp_path, kind):
    """The objective as the trainer builds it, on batches full of every special id the tokenizer
    has (pad, eos, mask, unk, ...): those positions never get a label nor a replacement, random
    replacements never insert one, and the other tokens are chosen at the rate mask_prob."""
    mask_prob = 0.15
    run = prepare_run(tiny_options(tmp_path, arch="encoder", tokenizer=kind, vocab_size=300 if kind == "bpe" else None,
                                   block_size=64, mask_prob=mask_prob))
    objective, tokenizer = run.trainer.objective, run.tokenizer
    special_ids = tokenizer.special_ids
    roles = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.mask_id, tokenizer.unk_id} - {None}
    assert roles <= set(special_ids) and len(special_ids) >= 3
    special = torch.tensor(special_ids)
    generator = torch.Generator().manual_seed(0)
    chosen_total = eligible_total = 0
    for _ in range(100):
        x, y = run.trainer.sampler.next_batch()
        x = with_special_tokens(x, special_ids, generator)
        batch = objective.batch(x, y, generator)
        inputs, labels = batch["input_ids"], batch["labels"]
        is_special = torch.isin(x, special)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & is_special).any(), "a special token was selected for prediction"
        assert torch.equal(inputs[is_special], x[is_special]), "a special token was replaced"
        assert torch.equal(labels[chosen], x[chosen])
        inserted = inputs[chosen & (inputs != x)]
        assert not torch.isin(inserted[inserted != tokenizer.mask_id], special).any()
        chosen_total += int(chosen.sum())
        eligible_total += int((~is_special).sum())
    # Each eligible token is chosen independently with probability mask_prob (the forced pick of
    # a row left empty adds ~0.85**40 per row: nothing here), so the rate is binomial: 5 standard
    # errors (~0.014 for ~17,000 tokens) bound it with a false-alarm chance below one in a million.
    rate = chosen_total / eligible_total
    tolerance = 5 * math.sqrt(mask_prob * (1 - mask_prob) / eligible_total)
    assert eligible_total > 10_000
    assert abs(rate - mask_prob) < tolerance, (rate, tolerance)


# --------------------------------------------------------------------------- atomic checkpoints


def fail_checkpoint_write(monkeypatch, step: int, nth_file: int) -> list[str]:
    """Make the nth file written into checkpoint `step` die half-way (some bytes on disk, then
    ENOSPC). Every file lmforge writes goes through lmforge.atomic._atomic_write; the failing one
    still runs the real atomic machinery, so a torn file lands wherever that puts it."""
    real_write = atomic._atomic_write
    written: list[str] = []

    def write(path, fill):
        path = Path(path)
        if path.parent.parent.name == checkpoint.CHECKPOINT_DIR and f"{step:08d}" in path.parent.name:
            written.append(path.name)
            if len(written) == nth_file:
                def torn(handle):
                    content = io.BytesIO()
                    fill(content)
                    handle.write(content.getvalue()[: len(content.getvalue()) // 2])
                    raise OSError(28, "No space left on device")

                return real_write(path, torn)
        return real_write(path, fill)

    monkeypatch.setattr(atomic, "_atomic_write", write)
    return written


@pytest.mark.parametrize("nth_file", [2, 4], ids=["second-file", "last-file"])
def test_a_save_that_fails_part_way_is_never_listed_loaded_or_resumed(tmp_path, monkeypatch, nth_file):
    """A checkpoint folder is complete or absent: after the step-4 save dies at its nth file
    (of model, config, tokenizer, trainer state), step 2 is still the newest checkpoint and the
    top-level model, and resuming from it reproduces the uninterrupted run exactly."""
    options = dict(max_steps=6, save_every=2, log_every=1)
    whole = prepare_run(tiny_options(tmp_path, out="whole", **options))
    whole.trainer.fit()

    crashed = prepare_run(tiny_options(tmp_path, out="crashed", **options))
    crashed.trainer.fit(until=2)
    at_step_2 = snapshot(crashed.model)
    with monkeypatch.context() as patch:
        written = fail_checkpoint_write(patch, step=4, nth_file=nth_file)
        with pytest.raises(OSError, match="No space left"):
            crashed.trainer.fit()
    assert len(written) == nth_file  # the failure happened where intended
    out = tmp_path / "crashed"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002"]
    assert_same_weights(snapshot(load_model(out)[0]), at_step_2)
    assert_same_weights(snapshot(load_model(checkpoint_dirs(out)[-1])[0]), at_step_2)

    resumed = prepare_run({"out": str(out), "resume": True})
    assert resumed.trainer.step == 2
    resumed.trainer.fit()
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000004", "step-00000006"]
    assert not list((out / checkpoint.CHECKPOINT_DIR).glob(".*"))  # the dead save's leftovers are gone
    assert_runs_identical(out, tmp_path / "whole", resumed.model, whole.model)


# --------------------------------------------------------------------------- gradient accumulation


def micro_batch_gradient(model, batch: dict) -> tuple[float, dict]:
    """(loss, gradients) of one micro-batch alone, on a copy of the model."""
    twin = copy.deepcopy(model).train()
    loss = twin(**batch, return_logits=False).loss
    loss.backward()
    return loss.item(), gradients(twin)


def test_grad_accum_clips_and_applies_the_mean_of_the_micro_batch_gradients(tmp_path, monkeypatch):
    """With grad_accum=k the loss of each micro-batch is divided by k: the gradient reaching the
    clipping is the mean of the k gradients each micro-batch gives alone, and so is the loss."""
    k = 3
    run = prepare_run(tiny_options(tmp_path, batch_size=4, grad_accum=k, bf16=False, warmup_steps=0))
    trainer = run.trainer
    draw = WindowSampler(trainer.train_store, 16, 4, seed=123)
    micro_batches = [draw.next_batch() for _ in range(k)]
    noise = torch.Generator().manual_seed(0)  # clm draws no noise; the trainer's own generator stays untouched
    alone = [micro_batch_gradient(run.model, trainer.objective.batch(x, y, noise)) for x, y in micro_batches]

    queue = list(micro_batches)
    trainer.sampler.next_batch = lambda: queue.pop(0)
    at_clipping: list[dict] = []
    real_clip = trainer_module.clip_gradients

    def recording_clip(parameters, max_norm):
        parameters = list(parameters)
        at_clipping.append(gradients(run.model))
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(trainer_module, "clip_gradients", recording_clip)
    result = trainer.train_step()
    assert not queue and len(at_clipping) == 1

    losses = [loss for loss, _ in alone]
    assert len(set(losses)) == k  # distinct micro-batches: their mean is neither one of them nor their sum
    assert result["loss"] == pytest.approx(sum(losses) / k, rel=1e-6)
    accumulated = at_clipping[0]
    assert accumulated.keys() == alone[0][1].keys()
    for name, grad in accumulated.items():
        mean = sum(grads[name] for _, grads in alone) / k
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-7, msg=name)  # summation order only
    assert result["grad_norm"] == pytest.approx(global_norm(accumulated), rel=1e-5)
