"""Prompt tuning (Lester et al., 2021): n trainable vectors read before every input, on a frozen model.

The vectors are `LanguageModel.soft_prompt` (the model core prepends them; model/transformer.py),
so classification, QA, instructions and generation all use them without knowing. They start as
the embeddings of n tokens drawn from the vocabulary, which the paper found to train better than
random vectors. A prompt-tuned run's folder is an adapter folder (finetune/lora.py's spec with
`prompt_tokens`): it stores the n × C prompt (and a task head), and names its base.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError

# Prompt vectors need a far larger step than weights (the paper used 0.3 with Adafactor); 3e-2 with
# AdamW is the usual choice in PEFT's examples. No decay: it would pull the prompt toward zero.
TRAIN_DEFAULTS = {"lr": 3e-2, "min_lr": 3e-3, "weight_decay": 0.0}


def check_length(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmforgeError(f"--prompt-tuning must be a whole number of virtual tokens, at least 1; got {value!r}")
    return value


def add_soft_prompt(model: nn.Module, n: int) -> nn.Module:
    """Give `model` n prompt vectors, copies of random vocabulary rows (the global RNG's draw)."""
    if model.soft_prompt is not None:
        raise LmforgeError("the model already has a soft prompt")
    if n >= model.config.block_size:
        raise LmforgeError(f"--prompt-tuning {n} leaves no room for input in a block of {model.config.block_size}")
    table = model.token_embedding.weight
    rows = torch.randint(table.shape[0], (n,))
    model.soft_prompt = nn.Parameter(table.detach()[rows].clone())
    return model
