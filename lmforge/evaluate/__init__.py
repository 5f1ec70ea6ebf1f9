"""Evaluation: perplexity and bits per byte of language models, and every task metric (no task writes its own)."""

from lmforge.evaluate.bootstrap import bootstrap_interval, metric_interval
from lmforge.evaluate.metrics import (
    accuracy,
    bleu,
    choice_accuracy,
    chrf,
    exact_match,
    macro_f1,
    normalize_answer,
    rouge,
    squad_scores,
    token_f1,
)
from lmforge.evaluate.perplexity import evaluate_store

__all__ = [
    "accuracy", "bleu", "bootstrap_interval", "choice_accuracy", "chrf", "evaluate_store", "exact_match",
    "macro_f1", "metric_interval", "normalize_answer", "rouge", "squad_scores", "token_f1",
]
