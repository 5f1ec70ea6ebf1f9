"""bf16 autocast training, tested on its own terms: close to fp32 within what bf16's precision
allows, exact where no rounding differs (resume replays the same operations).

The rest of the suite pins fp32 (tiny_options' bf16=False), so that its exact comparisons hold on
every CPU; these tests switch bf16 on explicitly, so they run the same on CPUs with bf16 units and
on AVX2-only ones (where bf16 is emulated: slow, but the same numbers up to summation order).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_same_weights, read_metrics, snapshot, tiny_options, token_cache  # noqa: F401

from lmforge.config import ModelConfig
from lmforge.model.norms import RMSNorm, make_norm
from lmforge.train.pretrain import prepare_run

# bf16 keeps 8 significant bits (7 stored, one implicit): rounding to it moves a value by at most
# 2**-8 of itself (the unit roundoff). Products are accumulated in fp32, so errors do not grow with
# the length of a dot product, only with the number of successive roundings.
BF16_UNIT_ROUNDOFF = 2.0**-8


def _one_step_loss_and_gradient(run) -> tuple[float, torch.Tensor]:
    """The loss and flattened gradient of the run's first batch, masked with a fixed generator."""
    x, y = run.trainer.sampler.next_batch()
    batch = run.trainer.objective.batch(x, y, torch.Generator().manual_seed(0))
    with run.trainer.autocast:
        loss = run.trainer._run(batch).loss
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])
    return loss.item(), gradient


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_bf16_loss_and_gradient_stay_within_bf16_rounding_of_fp32(tmp_path, arch):
    runs = {bf16: prepare_run(tiny_options(tmp_path, out=f"bf16-{bf16}", arch=arch, n_layer=2, bf16=bf16))
            for bf16 in (False, True)}
    assert_same_weights(snapshot(runs[False].model), snapshot(runs[True].model))
    (loss32, grad32), (loss16, grad16) = (_one_step_loss_and_gradient(runs[b]) for b in (False, True))
    # The loss is a mean of fp32 log-softmaxes over bf16 logits: per-token errors of about one
    # unit roundoff average out (measured ~2e-5 relative), so one unit roundoff bounds it.
    assert loss16 == pytest.approx(loss32, rel=BF16_UNIT_ROUNDOFF)
    assert loss16 != loss32  # bf16 really ran: some rounding differs
    # A gradient element passes through ~6 bf16 roundings here (two per layer's products, the
    # head, the backward products), each up to one unit roundoff: 8 units bound the relative
    # error of the whole vector (measured ~1%).
    relative_error = float((grad16 - grad32).norm() / grad32.norm())
    assert relative_error <= 8 * BF16_UNIT_ROUNDOFF, relative_error


def test_bf16_accumulation_matches_one_big_batch_within_rounding(tmp_path):
    """The accumulation test of test_train.py, in bf16: the same windows split into micro-batches
    round differently (oneDNN blocks a bf16 product by its row count), so only close."""
    big = prepare_run(tiny_options(tmp_path, out="big", batch_size=8, warmup_steps=0, bf16=True))
    small = prepare_run(tiny_options(tmp_path, out="small", batch_size=4, grad_accum=2, warmup_steps=0, bf16=True))
    windows = [big.trainer.sampler.next_batch() for _ in range(2)]
    big.trainer.sampler.next_batch = iter(windows).__next__
    halves = [(x[h], y[h]) for x, y in windows for h in (slice(0, 4), slice(4, 8))]
    small.trainer.sampler.next_batch = iter(halves).__next__
    for _ in range(2):
        a, b = big.trainer.train_step(), small.trainer.train_step()
        # Both are means of the same 8 windows' fp32 cross-entropies over bf16 logits.
        assert a["loss"] == pytest.approx(b["loss"], rel=BF16_UNIT_ROUNDOFF)
        # Gradient norms: sums of the same per-window gradients, each within a few roundings.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=4 * BF16_UNIT_ROUNDOFF)
        # Halving the batch's loss scale (a lost `/ grad_accum`) would double the norm: far outside.


def test_bf16_resume_is_exact(tmp_path):
    """Resuming replays the same bf16 operations on the same values, so it is exact, as in fp32."""
    options = dict(max_steps=8, save_every=4, bf16=True, dropout=0.1)
    straight = prepare_run(tiny_options(tmp_path, out="straight", **options))
    straight.trainer.fit()
    first = prepare_run(tiny_options(tmp_path, out="split", **options))
    first.trainer.fit(until=4)
    second = prepare_run(tiny_options(tmp_path, out="split", resume=True, **options))
    assert second.resumed and second.trainer.bf16
    second.trainer.fit()
    losses = [[r["loss"] for r in read_metrics(tmp_path / name, "train")] for name in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert_same_weights(snapshot(straight.model), snapshot(second.model))


def test_rms_norm_normalises_bf16_input_in_fp32_under_autocast():
    """rms_norm is not on autocast's fp32 list (layer_norm is): without the cast, a bf16 input
    meets the fp32 weight, torch warns and normalises in bf16."""
    norm = make_norm(ModelConfig(norm="rmsnorm", n_embd=64))
    assert isinstance(norm, RMSNorm)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")  # the "Mismatch dtype" warning fails the test
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x.float(), (64,), norm.weight, norm.eps),
                               rtol=0, atol=0)
    assert norm(x.float()).dtype == torch.float32  # outside autocast: nn.RMSNorm unchanged
