"""Pretraining objectives: how a window of tokens becomes model inputs and labels.

- clm: next-token prediction (decoder). The window sampler already yields (x, y = x shifted).
- mlm: BERT masking (encoder): 15% of tokens chosen, 80% → <mask>, 10% random, 10% kept;
  optionally whole words at a time; segment ids 0/1 split at the first eos of the window when
  the model has segment embeddings (collate.segment_ids says why that is the pair).
- denoise: BART-style text infilling (encoder-decoder): spans of the source collapse into one
  <mask> each; the decoder rebuilds the original window.
- span: T5-style span corruption (encoder-decoder): the same spans collapse into one <mask>
  each; the decoder produces only the removed spans, each after its <mask>.
Each returns the keyword arguments of `LanguageModel.forward`, labels included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.collate import corrupt_spans, mask_tokens, segment_ids, span_corruption, word_start_table
from lmforge.errors import LmforgeError

DEFAULT_FOR_ARCH = {"decoder": "clm", "encoder": "mlm", "encoder-decoder": "denoise"}
ARCHS_FOR_OBJECTIVE = {"clm": ("decoder",), "mlm": ("encoder",), "denoise": ("encoder-decoder",),
                       "span": ("encoder-decoder",)}


class Objective:
    def __init__(self, name: str, config: ModelConfig, mask_prob: float = 0.15, special_ids: Sequence[int] = (),
                 word_starts: torch.Tensor | None = None):
        """`special_ids`: the tokenizer's own special tokens (e.g. <unk>, which the config does not
        name); masking never selects them, nor the config's pad, eos, bos and mask. `word_starts`
        (collate.word_start_table): mlm masks whole words."""
        if config.arch not in ARCHS_FOR_OBJECTIVE[name]:
            raise LmforgeError(f"objective {name} does not fit arch {config.arch}; use {DEFAULT_FOR_ARCH[config.arch]}")
        if name in ("mlm", "denoise", "span") and config.mask_token_id is None:
            raise LmforgeError(f"objective {name} needs a <mask> token in the tokenizer")
        if word_starts is not None and name != "mlm":
            raise LmforgeError(f"whole-word masking is for the mlm objective; this one is {name}")
        self.name, self.config, self.mask_prob, self.word_starts = name, config, mask_prob, word_starts
        roles = (config.pad_token_id, config.eos_token_id, config.bos_token_id, config.mask_token_id)
        self.special_ids = sorted({i for i in (*roles, *special_ids) if i is not None})
        # Segment embeddings learn "first part / second part" only if pretraining shows both parts.
        self.with_segments = name == "mlm" and config.type_vocab_size >= 2 and config.eos_token_id is not None

    @classmethod
    def for_training(cls, train: TrainConfig, config: ModelConfig, tokenizer=None) -> Objective:
        """The objective a training run's options ask for: the tokenizer's special tokens are never
        masked, and with train.whole_word_mask its word-start table makes mlm mask whole words."""
        specials = tokenizer.special_ids if tokenizer is not None else ()
        word_starts = None
        if train.whole_word_mask:
            if tokenizer is None:
                raise LmforgeError("whole-word masking needs the tokenizer: words are read from its token strings")
            word_starts = word_start_table(tokenizer, config.vocab_size)
        return cls(train.objective, config, train.mask_prob, specials, word_starts)

    def batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict:
        if self.name == "clm":
            return {"input_ids": x, "labels": y}
        whole = (y != -100).all(dim=1)  # evaluation pads its last window; these objectives skip it
        x, y = x[whole], y[whole]
        window = torch.cat([x, y[:, -1:]], dim=1)  # the full block+1 tokens
        if self.name == "mlm":
            ids = window[:, :-1]
            inputs, labels = mask_tokens(
                ids, self.config.mask_token_id, self.config.vocab_size, self.mask_prob,
                generator, self.special_ids, self.word_starts,
            )
            batch = {"input_ids": inputs, "labels": labels}
            if self.with_segments:
                batch["token_type_ids"] = segment_ids(ids, self.config.eos_token_id)
            return batch
        if self.name == "span":
            source, target = span_corruption(window[:, :-1], self.config.mask_token_id, self.mask_prob, generator)
        else:
            source = corrupt_spans(window[:, :-1], self.config.mask_token_id, self.mask_prob, generator)
            target = window[:, :-1]
        attention_mask = (source != -1).long()
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        source = source.masked_fill(source == -1, pad)
        start = self.config.decoder_start_token_id
        start = start if start is not None else (self.config.eos_token_id or 0)
        decoder_input = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], dim=1)
        return {
            "input_ids": source,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input.masked_fill(decoder_input == -1, pad),
            "labels": target.masked_fill(target == -1, -100),
        }
