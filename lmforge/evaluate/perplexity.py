"""Held-out loss, perplexity and bits per byte.

A full pass scores every token of the split exactly once (non-overlapping windows), so the
figures are exact for that split, not estimates; `max_batches` trades that for speed during
training. Bits per byte divide the total loss by the text's UTF-8 size, which makes models with
different tokenizers comparable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.data.collate import eval_windows
from lmforge.errors import LmforgeError


@torch.no_grad()
def evaluate_store(model, store, objective, batch_size: int, max_batches: int | None = None, seed: int = 0,
                   seq_len: int | None = None, per_window: list | None = None, progress=None) -> dict:
    """Mean loss per predicted token over the store's windows of seq_len tokens (default: the
    model's block_size); masking noise is seeded, so the figure is repeatable.

    `per_window`, a list, receives each window's (summed loss, targets): the units a bootstrap
    interval resamples (evaluate/tasks.py). `progress(n)` is told of every n windows scored."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total_loss, total_targets = 0.0, 0
    for x, y in eval_windows(store, seq_len or model.config.block_size, batch_size, max_batches):
        batch = {k: v.to(device) for k, v in objective.batch(x, y, generator).items()}
        n_targets = int((batch["labels"] != -100).sum())
        if n_targets == 0:
            continue
        if per_window is None:
            total_loss += float(model(**batch, return_logits=False).loss) * n_targets
        else:
            sums, counts = _window_losses(model, batch)
            per_window.extend(zip(sums, counts, strict=True))
            total_loss += sum(sums)
        total_targets += n_targets
        if progress is not None:
            progress(len(x))
    model.train(was_training)
    if total_targets == 0:
        raise LmforgeError(f"nothing to evaluate: the text has {len(store)} token(s)")
    loss = total_loss / max(total_targets, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_targets}
    if max_batches is None and objective.name == "clm" and store.n_bytes:
        result["bits_per_byte"] = total_loss / math.log(2) / store.n_bytes
    return result


def _window_losses(model, batch: dict) -> tuple[list[float], list[int]]:
    """Each row's summed token loss and its number of targets."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses.sum(1).tolist(), (labels != -100).sum(1).tolist()


def evaluate_corpus(model, tokenizer, paths, batch_size: int = 8, max_batches: int | None = None,
                    limit: int | None = None, per_window: list | None = None, progress=None) -> dict:
    """Evaluate a model folder's model on text files: every token scored once (unless limited);
    `limit` keeps the first documents only."""
    import numpy as np

    from lmforge.data.corpus import load_corpus
    from lmforge.data.store import TokenStore, token_dtype
    from lmforge.train.objectives import DEFAULT_FOR_ARCH, Objective

    documents, _ = load_corpus(paths)
    documents = documents[:limit] if limit is not None else documents
    separator = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stream = [t for ids in tokenizer.encode_batch(documents) for t in ids + separator]
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    store = TokenStore(np.asarray(stream, dtype=token_dtype(tokenizer.vocab_size)), n_bytes)
    objective = Objective(DEFAULT_FOR_ARCH[model.config.arch], model.config, special_ids=tokenizer.special_ids)
    return evaluate_store(model, store, objective, batch_size, max_batches=max_batches, per_window=per_window,
                          progress=progress)
