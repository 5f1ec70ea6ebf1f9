"""Output heads: what turns hidden states into predictions for each objective."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.model.layers import ACTIVATIONS, make_norm
from lmforge.model.linear import Linear


class LMHead(nn.Module):
    """Next-token logits; its weight may be the token embedding itself (tied, as in GPT-2).
    The optional bias is BART's final_logits_bias."""

    def __init__(self, config):
        super().__init__()
        self.proj = Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)

    def tie(self, embedding: nn.Embedding) -> None:
        self.proj.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class MLMHead(nn.Module):
    """BERT's masked-token head: a transform (dense, activation, norm), then vocabulary logits.
    Its two linear layers keep biases whatever `bias` says, as BERT's do."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd)
        self.act = ACTIVATIONS["gelu" if config.activation == "swiglu" else config.activation]()
        self.norm = make_norm(config)
        self.proj = Linear(config.n_embd, config.vocab_size)

    def tie(self, embedding: nn.Embedding) -> None:
        self.proj.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.act(self.dense(hidden))))


class ClassifierHead(nn.Module):
    """BERT's sequence classifier: the first token's vector, pooled (dense + tanh), then dropout
    and one linear layer to the labels. Nothing in it is tied to the vocabulary."""

    def __init__(self, config):
        super().__init__()
        self.pool = Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.out = Linear(config.n_embd, config.n_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.pool(hidden[:, 0]))))
