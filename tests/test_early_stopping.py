"""Early stopping keeps the best validated model as the run folder's model and stops when patience
runs out; a resumed run remembers both. Validation figures are scripted, so the test says exactly
which evaluation is best."""

from __future__ import annotations

import pytest
from helpers import (  # noqa: F401  (token_cache and one_thread are autouse fixtures)
    assert_same_weights,
    one_thread,
    script_validation,
    snapshot,
    tiny_options,
    token_cache,
)

from lmforge.model_folder import load_model
from lmforge.train.checkpoint import BEST_DIR, checkpoint_dirs
from lmforge.train.pretrain import prepare_run
from lmforge.train.selection import BestModel


def test_the_best_loss_is_kept_and_patience_ends_the_run(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=40, eval_every=5, save_every=100,
                                   early_stopping_patience=2))
    weights_at = script_validation(run.trainer, [3.0, 2.0, 2.5, 2.6, 1.0])
    summary = run.trainer.fit()
    assert summary["stopped_early"] and summary["step"] == 20  # evaluations at 5, 10 (best), 15, 20: stop
    assert summary["best"] == {"metric": "loss", "value": 2.0, "step": 10}
    out = tmp_path / "run"
    assert_same_weights(snapshot(load_model(out / BEST_DIR)[0]), weights_at[10])
    assert_same_weights(snapshot(load_model(out)[0]), weights_at[10])  # the folder's model is the best
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000020"]  # the newest step still resumes

    again = prepare_run({"out": str(out), "resume": True})
    assert again.resumed and again.trainer.stopped_early
    assert again.trainer.fit()["step"] == 20  # a stopped run stays stopped


def test_a_resumed_run_remembers_the_best_so_far(tmp_path):
    options = tiny_options(tmp_path, max_steps=30, eval_every=5, save_every=5, early_stopping_patience=3)
    first = prepare_run(options)
    script_validation(first.trainer, [3.0, 1.5, 2.0])
    first.trainer.fit(until=15)
    second = prepare_run({**options, "resume": True})
    assert second.trainer.best.value == 1.5 and second.trainer.best.evaluations_since == 1
    script_validation(second.trainer, [1.6, 1.7, 1.8])  # steps 20, 25, 30: patience 3 runs out at 30
    summary = second.trainer.fit()
    assert summary["best"] == {"metric": "loss", "value": 1.5, "step": 10} and summary["stopped_early"]


def test_without_patience_nothing_is_selected(tmp_path):
    run = prepare_run(tiny_options(tmp_path, max_steps=10, eval_every=5))
    summary = run.trainer.fit()
    assert summary["best"] is None and not summary["stopped_early"] and summary["step"] == 10
    assert not (tmp_path / "run" / BEST_DIR).exists()


@pytest.mark.parametrize("higher,figures,best", [(True, [0.5, 0.8, 0.8, 0.7], 0.8), (False, [0.5, 0.8, 0.4], 0.4)])
def test_best_model_compares_in_the_metric_direction_and_ignores_nan(higher, figures, best):
    keeper = BestModel("accuracy", higher, patience=5)
    for step, value in enumerate([*figures, float("nan")]):
        keeper.improved({"accuracy": value}, step)
    assert keeper.value == best and keeper.step == figures.index(best)
    assert keeper.evaluations_since == len(figures) - figures.index(best)  # equal is not better; nan never
