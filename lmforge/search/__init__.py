"""Hyperparameter search (`lmforge search`): many short training runs, judged by validation.

Optuna drives it. A space file (space.py) maps option names to distributions; every trial
(run.py) prepares its run exactly as `pretrain` or `finetune` would, with the trial's values on
top, in its own folder `OUT/trials/trial-N`, and trains it in this process. The objective is the
run's final validation figure, or the best one when early stopping kept a best: loss for language
models (minimised), accuracy for classifiers (maximised). After each of the trainer's evaluations
the figure goes to a median pruner, which may stop the trial there.

The study lives in a database (study.py; SQLite in OUT unless --storage names another), so a
search resumes after a kill and several processes or machines can share one. When the study has
--trials finished trials, each process writes OUT's results (report.py).
"""

from lmforge.search.run import SearchPlan, run_search

__all__ = ["SearchPlan", "run_search"]
