"""The trials of `lmforge search`: each a pretrain or finetune run with the trial's values on top,
prepared as the training verb prepares it and trained in this process; and the workers that run them."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from lmforge.errors import LmforgeError
from lmforge.search.report import trial_folder, write_results
from lmforge.search.space import check_option_names, grid_values, read_space, suggest
from lmforge.search.study import counts, is_surplus, open_study, record_worker, requeue, requeue_dead_here

SAMPLERS = ("grid", "random", "tpe")
POLL_SECONDS = 1.0  # how often a worker with nothing left to start looks whether the others are done


@dataclass
class SearchPlan:
    """Everything one `lmforge search` needs; validated whole on creation, so mistakes surface
    before any training, and picklable, so --jobs worker processes get it as it is."""

    out: Path
    trials: int
    space_file: str
    options: dict  # the training command's options (plan_run), before each trial's values
    prepare: Callable  # prepare_run or prepare_task_run, as the training verb would call it
    how: dict = field(default_factory=dict)  # that function's keyword arguments
    sampler: str = "tpe"
    seed: int | None = None
    jobs: int = 1
    timeout: float | None = None
    storage: str | None = None
    space: dict[str, BaseDistribution] = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.trials < 1:
            raise LmforgeError(f"--trials must be at least 1; got {self.trials}")
        if self.jobs < 1:
            raise LmforgeError(f"--jobs must be at least 1; got {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise LmforgeError(f"--timeout must be positive; got {self.timeout}")
        if self.sampler not in SAMPLERS:
            raise LmforgeError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        for owned, why in (("out", "each trial writes OUT/trials/trial-N"), ("resume", "run the same search again")):
            if self.options.get(owned):
                raise LmforgeError(f"drop --{owned} from the training command: {why}")
        self.space = read_space(self.space_file, partial(check_option_names, self.prepare, self.options))
        if self.sampler == "grid":
            grid_values(self.space)  # refuses a continuous range now, not at the first trial

    @property
    def metric(self) -> tuple[str, bool]:
        """What the runs are judged by: the trainer's own selection_metric (checked at every trial)."""
        from lmforge.train.trainer import Trainer

        return ("accuracy", True) if self.options.get("task") == "classify" else Trainer.selection_metric

    @property
    def study_name(self) -> str:
        """The study is named after OUT's last part: machines sharing a database share a study by it."""
        return self.out.resolve().name

    @property
    def wanted(self) -> int:
        """The finished trials the search stops at: --trials, or the grid's size if that is smaller."""
        if self.sampler != "grid":
            return self.trials
        return min(self.trials, math.prod(map(len, grid_values(self.space).values())))


class TrialFailed(Exception):
    """Training failed (e.g. diverged): the trial counts as failed and the search goes on."""


class _Surplus(Exception):
    """The study had enough trials by the time this one started: it ends untrained."""


def work(study: optuna.Study, plan: SearchPlan, echo: Callable[[str], None] = print) -> None:
    """One worker: run trials until the study has --trials finished ones (waiting for other
    workers' last trials, so the results are whole) or --timeout has passed."""
    deadline = time.monotonic() + plan.timeout if plan.timeout else math.inf
    wanted = plan.wanted
    while time.monotonic() < deadline:
        requeue_dead_here(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(map(counts, trials))
        if finished >= wanted:
            return
        if finished + sum(t.state == TrialState.RUNNING for t in trials) >= wanted:
            optuna.storages.fail_stale_trials(study)  # the last places are taken: wait for them
            time.sleep(POLL_SECONDS)
            continue
        try:
            study.optimize(partial(_objective, plan, wanted, echo), n_trials=1, catch=(TrialFailed, _Surplus),
                           callbacks=[partial(_announce, plan.metric[0], echo)], gc_after_trial=True)
        except ValueError as exc:  # optuna's "Cannot tell a FAIL trial": another worker took it for dead
            if not str(exc).startswith("Cannot tell a"):
                raise
            echo("note: another worker took this trial for dead (no heartbeat) and queued its values again")


def _objective(plan: SearchPlan, wanted: int, echo: Callable[[str], None], trial: optuna.Trial) -> float:
    if is_surplus(trial, wanted):
        trial.set_user_attr("surplus", True)
        raise _Surplus
    record_worker(trial)
    try:
        return _train_trial(plan, trial, echo)
    except KeyboardInterrupt:  # the next search runs these values again
        requeue(trial.study, next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number))
        raise


def _train_trial(plan: SearchPlan, trial: optuna.Trial, echo: Callable[[str], None]) -> float:
    params = {name: suggest(trial, name, dist) for name, dist in plan.space.items()}
    echo(f"trial {trial.number}: {describe(params)}")
    options = {"progress": False, **plan.options, **params, "out": str(plan.out / trial_folder(trial.number))}
    try:
        run = plan.prepare(options, **plan.how)
    except LmforgeError as exc:  # values the run refuses: the space needs fixing, not just this trial
        trial.set_user_attr("refused", str(exc))
        raise LmforgeError(f"trial {trial.number} ({describe(params)}): {exc}") from None
    if run.trainer.selection_metric != plan.metric:
        raise RuntimeError(f"the run is judged by {run.trainer.selection_metric}, the study by {plan.metric}")
    metric = plan.metric[0]
    _report_evaluations(run.trainer, trial, metric)
    try:
        summary = run.trainer.fit()
    except LmforgeError as exc:
        trial.set_user_attr("error", str(exc))
        raise TrialFailed(str(exc)) from None
    trial.set_user_attr("step", summary["step"])
    best = summary.get("best")
    value = best["value"] if best and best["step"] is not None else summary["val"][metric]
    if not math.isfinite(value):
        trial.set_user_attr("error", f"validation {metric} is {value}")
        raise TrialFailed(trial.user_attrs["error"])
    return value


def _report_evaluations(trainer, trial: optuna.Trial, metric: str) -> None:
    """After each evaluation fit makes, once it is logged and early stopping has seen it (`select`),
    give the figure to the pruner; a trial it gives up on stops there, its checkpoints kept."""
    select = trainer.select

    def select_and_report(result: dict) -> None:
        select(result)
        trial.report(float(result[metric]), trainer.step)
        if trial.should_prune():
            trial.set_user_attr("step", trainer.step)
            raise optuna.TrialPruned(f"pruned at step {trainer.step}")

    trainer.select = select_and_report


def _announce(metric: str, echo: Callable[[str], None], study: optuna.Study, trial) -> None:
    if trial.user_attrs.get("surplus"):
        return
    if trial.state == TrialState.COMPLETE:
        echo(f"trial {trial.number}: {metric} {trial.value:.4f}")
    elif trial.state == TrialState.PRUNED:
        echo(f"trial {trial.number}: pruned at step {trial.user_attrs.get('step')}")
    elif "error" in trial.user_attrs:
        echo(f"trial {trial.number}: failed: {trial.user_attrs['error']}")


def describe(params: dict) -> str:
    return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in params.items())


def run_search(plan: SearchPlan, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume, or join) the search, then write OUT's results; returns results.json's content."""
    study = open_study(plan, plan.seed)  # before any helper starts: they load it, never race to create it
    if plan.wanted < plan.trials:
        echo(f"note: the grid has {plan.wanted} points; each runs once")
    if plan.jobs > 1:
        _share_cores(plan.jobs)
    helpers = [_start_helper(plan, index) for index in range(1, plan.jobs)]
    try:
        work(study, plan, echo)
    except BaseException:
        for helper in helpers:  # a Ctrl-C reached them too: give them time to put their trials back in the queue
            helper.join(timeout=10)
            helper.terminate()  # a trial it leaves running is requeued when the search runs again
        raise
    for helper in helpers:
        helper.join()
    return write_results(study, plan)


def _start_helper(plan: SearchPlan, index: int):
    """--jobs: another worker process on the same study (training in threads would share torch's
    global random state and thread pool, so trials would neither be reproducible nor faster)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_helper_main, args=(plan, index), daemon=False)
    process.start()
    return process


def _share_cores(jobs: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _helper_main(plan: SearchPlan, index: int) -> None:
    import sys

    _share_cores(plan.jobs)
    try:  # its own sampler seed: the same one would draw the same values as the first worker
        work(open_study(plan, None if plan.seed is None else plan.seed + index), plan)
    except LmforgeError as exc:
        print(f"lmforge search: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
