"""Evaluation: perplexity and bits per byte of language models (metrics for tasks come later)."""

from lmforge.evaluate.perplexity import evaluate_store

__all__ = ["evaluate_store"]
