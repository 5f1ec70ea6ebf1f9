"""The space file of `lmforge search`: option names mapped to the values a trial may take.

    lr: {low: 1e-4, high: 3e-3, log: true}    # a float range, sampled on a log scale
    dropout: {low: 0.0, high: 0.3}           # a float range (with step: 0.05, its multiples only)
    n_layer: {low: 2, high: 4}               # integers, since both bounds are (step: 2 skips)
    batch_size: {choices: [16, 32]}          # a list of values: numbers, strings or booleans

Names are the flags' and config keys' names, checked by the run's own check of option names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from lmforge.config import ModelConfig, TrainConfig, read_config_file
from lmforge.errors import LmforgeError

NOT_SEARCHABLE = ("out", "resume", "task")  # the search owns the folders; the task decides the metric
SCHEMA = "give {low: A, high: B} (optionally log: true, or step: S) or {choices: [...]}"
# Each option's kind, from the dataclasses: a range of an int option must have int bounds.
OPTION_KINDS = {f.name: str(f.type).split(" |")[0] for f in (*fields(ModelConfig), *fields(TrainConfig))}
OPTION_KINDS.update(lora_rank="int", lora_alpha="float")  # LoRA options are not config fields
KIND_NAMES = {"int": "whole numbers", "float": "numbers", "bool": "true or false", "str": "strings"}


def read_space(path: str, check_names: Callable[[dict], object]) -> dict[str, BaseDistribution]:
    """Parse and check a space file: option name → {low, high[, log | step]} or {choices}."""
    try:
        raw = read_config_file(path)
    except LmforgeError as exc:  # the config reader's messages, about this file
        raise LmforgeError(str(exc).replace("config file", "space file", 1)) from None
    space = {str(name).replace("-", "_"): spec for name, spec in raw.items()}
    if not space:
        raise LmforgeError(f"{path}: the space is empty; name at least one option")
    owned = sorted(set(space) & set(NOT_SEARCHABLE))
    if owned:
        raise LmforgeError(f"{path}: {', '.join(owned)} cannot be searched")
    space = {name: _distribution(f"{path}: {name}", spec, OPTION_KINDS.get(name)) for name, spec in space.items()}
    try:  # the run's own check of option names, on one value of each
        check_names({name: _example(dist) for name, dist in space.items()})
    except LmforgeError as exc:
        raise LmforgeError(f"{path}: {exc}") from None
    return space


def _distribution(where: str, spec, kind: str | None) -> BaseDistribution:
    if not isinstance(spec, dict) or not spec:
        raise LmforgeError(f"{where}: {SCHEMA}; got {spec!r}")
    unknown = sorted(set(map(str, spec)) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise LmforgeError(f"{where}: unknown key(s) {', '.join(unknown)}; {SCHEMA}")
    if "choices" in spec:
        return _choices(where, spec, kind)
    if "low" not in spec or "high" not in spec:
        raise LmforgeError(f"{where}: a range needs both low and high")
    if kind not in (None, "int", "float"):
        raise LmforgeError(f"{where}: the option is not a number; give choices")
    low, high, step = (_number(spec.get(key)) for key in ("low", "high", "step"))
    log = spec.get("log", False)
    bounds = [low, high] + ([] if step is None else [step])
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in bounds):
        raise LmforgeError(f"{where}: low, high and step must be numbers")
    if not isinstance(log, bool):
        raise LmforgeError(f"{where}: log must be true or false; got {log!r}")
    if not low < high:
        raise LmforgeError(f"{where}: low ({low}) must be below high ({high})")
    if step is not None and (step <= 0 or abs((high - low) / step - round((high - low) / step)) > 1e-9):
        raise LmforgeError(f"{where}: step must be positive and divide high - low; got {step}")
    if log and (step is not None or low <= 0):
        raise LmforgeError(f"{where}: a log range needs low > 0 and no step")
    whole = all(isinstance(v, int) for v in bounds)
    if kind == "int" and not whole:
        raise LmforgeError(f"{where}: the option takes whole numbers; give integer low, high and step")
    if whole and kind != "float":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _choices(where: str, spec: dict, kind: str | None) -> CategoricalDistribution:
    if len(spec) > 1:
        raise LmforgeError(f"{where}: choices go alone, without {', '.join(sorted(set(spec) - {'choices'}))}")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise LmforgeError(f"{where}: choices must be a non-empty list")
    choices = [_number(c) for c in choices]
    if not all(isinstance(c, str | int | float | bool) for c in choices):
        raise LmforgeError(f"{where}: choices must be numbers, strings or booleans")
    misfit = next((c for c in choices if not _fits(kind, c)), None)
    if misfit is not None:
        raise LmforgeError(f"{where}: the option takes {KIND_NAMES[kind]}; got {misfit!r}")
    if len({(type(c), c) for c in choices}) < len(choices):
        raise LmforgeError(f"{where}: choices repeat a value")
    return CategoricalDistribution(choices)


def _fits(kind: str | None, value) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return kind not in KIND_NAMES or isinstance(value, bool if kind == "bool" else str)


def _number(value):
    """YAML reads 1e-4 (no dot) as a string; a number is meant."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _example(dist: BaseDistribution):
    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low


def check_option_names(prepare: Callable, options: dict, sample: dict) -> None:
    """The check the run itself makes of option names (and, for a task run, of what the model fixes)."""
    from lmforge.finetune import lora
    from lmforge.finetune.run import _split, prepare_task_run
    from lmforge.train.pretrain import split_options

    sample = {k: v for k, v in sample.items() if k.replace("-", "_") not in lora.OPTIONS}  # the runs take these first
    if prepare is prepare_task_run:
        _split(sample, options.get("init"))
    else:
        split_options(sample)


def suggest(trial, name: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def grid_values(space: dict[str, BaseDistribution]) -> dict[str, list]:
    """Every value of each option, for the grid sampler: choices, or an integer range's steps."""
    values = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            values[name] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise LmforgeError(f"--sampler grid needs choices or an integer range for every option; "
                               f"{name} is a {'log ' if dist.log else ''}{_kind(dist)} range")
    return values


def _kind(dist: BaseDistribution) -> str:
    return "float" if isinstance(dist, FloatDistribution) else "integer"
