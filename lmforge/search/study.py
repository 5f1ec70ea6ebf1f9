"""The study of `lmforge search`, in its database: creating or joining it, and keeping --trials exact.

A worker records its machine and process with each trial it runs, and Optuna's heartbeat records
that it is alive. A trial still running whose process is gone from this machine, or whose
heartbeat stopped (any machine), was killed: it is marked failed and its values go back in the
queue. --trials counts complete, pruned and failed-in-training trials; a worker that finds, after
starting a trial, that enough trials numbered before it already finished, run or wait, ends it
untrained (`is_surplus`), so workers racing for the last places never run too many.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState

from lmforge.errors import LmforgeError
from lmforge.search.space import grid_values

PRUNE_AFTER_TRIALS = 3  # the median pruner waits for this many finished trials before judging others
HEARTBEAT_SECONDS = 20  # a running trial's worker writes a sign of life this often ...
STALE_AFTER_SECONDS = 90  # ... and a trial without one for this long was killed: it runs again


def _machine() -> str:
    """Where a process id names the same process: this host, this boot of its kernel, this PID
    namespace (containers on one host have their own). Workers that share it can check each other's
    pids; elsewhere (not Linux) the host name alone stands for it."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("?")
    return "/".join(parts)


MACHINE = _machine()


def open_study(plan, seed: int | None) -> optuna.Study:
    """Create the study, or load it (a resumed search, or another worker's); refuse one that
    searched another space or metric, whose trials could not be compared with these."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # lmforge prints its own line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    metric, higher = plan.metric
    samplers = {"grid": lambda: optuna.samplers.GridSampler(grid_values(plan.space), seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=seed)}
    study = optuna.create_study(
        storage=_storage(plan), study_name=plan.study_name, direction="maximize" if higher else "minimize",
        sampler=samplers[plan.sampler](), pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS),
        load_if_exists=True)
    described = {"metric": metric, "space": {name: distribution_to_json(d) for name, d in plan.space.items()}}
    if "search" not in study.user_attrs:  # one attribute, written whole: a worker starting alongside reads all or none
        study.set_user_attr("search", described)
    elif study.user_attrs["search"] != described:
        raise LmforgeError(f"the study {plan.study_name!r} searched another space or metric; "
                           "give the same space, or another --out")
    return study


def _storage(plan) -> optuna.storages.RDBStorage:
    url = plan.storage or f"sqlite:///{(plan.out / 'study.db').resolve()}"
    engine = {}
    if url.startswith("sqlite:"):
        plan.out.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # wait for another worker's write instead of failing
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(5):  # workers starting together on a new database may race to create its tables
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=STALE_AFTER_SECONDS,
                heartbeat_stale_trial_callback=requeue)
        except (IntegrityError, OperationalError) as exc:  # that race, or a database that is down
            if attempt == 4:
                raise LmforgeError(f"cannot open the study storage: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as exc:  # a bad URL, a missing driver
            raise LmforgeError(f"cannot open the study storage: {str(exc).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def requeue(study: optuna.Study, trial) -> None:
    """Put a killed trial's values back in the queue: the next free worker trains them again, in a
    new folder (the old one keeps whatever it wrote)."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={**trial.system_attrs, "retry_of": trial.number}))


def record_worker(trial: optuna.Trial) -> None:
    """Who runs the trial: requeue_dead_here, on this machine, knows it was killed once the process is gone."""
    trial.set_user_attr("worker", {"machine": MACHINE, "pid": os.getpid()})


def requeue_dead_here(study: optuna.Study) -> None:
    """A trial left running by a process of this machine that no longer exists was killed: requeue
    it now. Other machines' trials go stale through their missing heartbeats instead (and a trial
    that never recorded its worker, after as long)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(trial):
            continue
        try:  # as optuna's own fail_stale_trials does; another worker may get there first
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except (RuntimeError, ValueError):
            continue
        requeue(study, trial)


def _is_dead(trial) -> bool:
    worker = trial.user_attrs.get("worker")
    if worker is None:  # killed in the milliseconds between starting and recording its worker
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > STALE_AFTER_SECONDS
    return worker.get("machine") == MACHINE and not _alive(worker.get("pid"))


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid recorded: not ours to judge
    return True


def counts(trial) -> bool:
    """Finished, as --trials counts: complete, pruned, or failed in training. A killed trial is not:
    it runs again."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def is_surplus(trial: optuna.Trial, wanted: int) -> bool:
    """True when `wanted` trials numbered before this one already finished, run or wait to run.
    Trial numbers grow with creation, so of several workers racing, only the first ones fit."""
    ahead = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    return sum(counts(t) or t.state in (TrialState.RUNNING, TrialState.WAITING) for t in ahead) >= wanted
