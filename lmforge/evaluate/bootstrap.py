"""Bootstrap confidence intervals for any metric, corpus-level ones included.

Resampling examples with replacement and recomputing the metric on each resample gives the
metric's sampling spread without assuming a formula for it, which corpus BLEU or macro F1 do not
have. The interval is the percentile one: the middle 95% of the resampled values. The resamples
come from numpy's Generator seeded by `seed`, so a reported interval can be reproduced exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lmforge.errors import LmforgeError


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n_examples: int, resamples: int = 1000,
                       seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of `statistic` over `resamples` bootstrap resamples.

    `statistic(indices)` computes the metric on the examples at those indices (an int array of
    length n_examples, with repeats), e.g. `lambda idx: correct[idx].mean()` or corpus BLEU on
    `[hyps[i] for i in idx]`.
    """
    if n_examples < 1:
        raise LmforgeError("bootstrap: no examples to resample")
    if resamples < 1:
        raise LmforgeError(f"bootstrap: resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise LmforgeError(f"bootstrap: confidence must be between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    # One resample at a time: a (resamples, n) index matrix would be gigabytes for large test sets.
    values = [statistic(rng.integers(0, n_examples, size=n_examples)) for _ in range(resamples)]
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _take(column: Sequence, indices: np.ndarray) -> Sequence:
    return column[indices] if isinstance(column, np.ndarray) else [column[i] for i in indices]


def metric_interval(metric: Callable, *columns: Sequence, key: str | None = None, resamples: int = 1000,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """{"value", "low", "high"} for `metric(*columns)`: its value on all examples and the bootstrap
    interval, resampling the same examples in every column.

    Each column holds one item per example: metric_interval(accuracy, predictions, references).
    For a metric returning a dict, `key` names the number: metric_interval(bleu, hyps, refs,
    key="score"); with several reference streams, pass each stream as its own column and a metric
    that regroups them (lambda h, *streams: bleu(h, list(streams))). The metric runs once per
    resample; for a mean of per-example scores (ROUGE, SQuAD) on a large set it is much faster to
    call bootstrap_interval on the per-example scores.
    """
    if not columns:
        raise LmforgeError("bootstrap: no data columns given")
    sizes = {len(column) for column in columns}
    if len(sizes) > 1:
        raise LmforgeError(f"bootstrap: columns differ in length ({', '.join(str(len(c)) for c in columns)})")

    def value(*data: Sequence) -> float:
        result = metric(*data)
        return float(result[key] if key is not None else result)

    low, high = bootstrap_interval(lambda indices: value(*(_take(c, indices) for c in columns)), sizes.pop(),
                                   resamples=resamples, seed=seed, confidence=confidence)
    return {"value": value(*columns), "low": low, "high": high}
