"""Sequence classification (BERT's and GPT-2's `ForSequenceClassification`): the stack of
`LanguageModel` with a `ClassifierHead` in place of the token head, and `build_model`, which picks
the class a config describes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model.heads import ClassifierHead
from lmforge.model.transformer import LanguageModel, ModelOutput


class SequenceClassifier(LanguageModel):
    """One label per sequence, from an encoder (BERT's way: [CLS] or the mean) or a decoder (GPT-2's
    way: the last real token). Reuses the stacks, embeddings, initialisation and parameter counts of
    LanguageModel; only the head and forward differ."""

    label_smoothing = 0.0  # set by a training run (TrainConfig.label_smoothing); applies in train mode only

    def make_head(self, config: ModelConfig) -> ClassifierHead:
        return ClassifierHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,  # accepted for the Trainer: a label's logits are always small
    ) -> ModelOutput:
        """logits (B, n_labels); labels (B,) give the cross-entropy loss."""
        if self.config.arch == "encoder":
            hidden = self.encode(input_ids, attention_mask, token_type_ids)
        else:
            hidden = self.decode(input_ids, attention_mask)
        logits = self.head(hidden, attention_mask)
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing) if labels is not None else None
        return ModelOutput(logits, loss, hidden)


def build_model(config: ModelConfig) -> LanguageModel:
    """A SequenceClassifier when the config has labels, otherwise a LanguageModel."""
    return SequenceClassifier(config) if config.n_labels else LanguageModel(config)
