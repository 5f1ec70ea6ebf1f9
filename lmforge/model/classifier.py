"""Task models: the stack of `LanguageModel` with another head in place of the token head.
Sequence classification (BERT's and GPT-2's `ForSequenceClassification`) has a `ClassifierHead`,
extractive QA (`BertForQuestionAnswering`) a `SpanHead`. `build_model` picks the class a config
describes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model.heads import ClassifierHead, SpanHead
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


class SpanExtractor(LanguageModel):
    """Extractive QA: each token's start and end logits; the answer is the best span (finetune/qa.py)."""

    def make_head(self, config: ModelConfig) -> SpanHead:
        return SpanHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        return_logits: bool = True,  # accepted for the Trainer: two logits per token are small
    ) -> ModelOutput:
        """logits (B, T, 2): start and end. With both positions (B,), the loss is the mean of the
        start and end cross-entropies over the real tokens, as transformers computes it."""
        if self.config.arch == "encoder":
            hidden = self.encode(input_ids, attention_mask, token_type_ids)
        else:
            hidden = self.decode(input_ids, attention_mask)
        logits = self.head(hidden).float()
        loss = None
        if start_positions is not None and end_positions is not None:
            masked = logits if attention_mask is None else logits.masked_fill(~attention_mask.bool()[..., None],
                                                                               float("-inf"))
            loss = (F.cross_entropy(masked[..., 0], start_positions)
                    + F.cross_entropy(masked[..., 1], end_positions)) / 2
        return ModelOutput(logits, loss, hidden)


def build_model(config: ModelConfig) -> LanguageModel:
    """A SequenceClassifier when the config has labels, a SpanExtractor for QA, otherwise a LanguageModel."""
    if config.arch == "lstm":
        from lmforge.model.lstm import LSTMSeq2Seq

        return LSTMSeq2Seq(config)
    if config.span_head:
        return SpanExtractor(config)
    return SequenceClassifier(config) if config.n_labels else LanguageModel(config)
