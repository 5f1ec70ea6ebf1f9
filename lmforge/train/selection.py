"""Model selection: keep the best validated model, and stop when it stops getting better.

With `early_stopping_patience` N, every evaluation is compared with the best so far (validation
loss for language models, accuracy for classifiers; `Trainer.selection_metric`). An improvement
writes the model to `best/` in the run folder; N evaluations in a row without one end the run.
When the run ends, however it ends, the run folder's top-level model is the best one, so every
command that reads the folder uses it, while `checkpoints/` still resume from the newest step.
"""

from __future__ import annotations

import math


class BestModel:
    def __init__(self, metric: str, higher_is_better: bool, patience: int):
        self.metric, self.higher_is_better, self.patience = metric, higher_is_better, patience
        self.value: float | None = None
        self.step: int | None = None
        self.evaluations_since = 0

    def improved(self, result: dict, step: int) -> bool:
        """Record one evaluation; True when it is the best so far (a non-finite figure never is)."""
        value = float(result[self.metric])
        better = math.isfinite(value) and (
            self.value is None or (value > self.value if self.higher_is_better else value < self.value))
        if better:
            self.value, self.step, self.evaluations_since = value, step, 0
        else:
            self.evaluations_since += 1
        return better

    @property
    def patience_ran_out(self) -> bool:
        return self.evaluations_since >= self.patience

    def summary(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step, "evaluations_since": self.evaluations_since}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step, self.evaluations_since = state["value"], state["step"], state["evaluations_since"]
