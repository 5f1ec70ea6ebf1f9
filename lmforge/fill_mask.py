"""Masked-token prediction: for each mask token in a text, the most likely tokens and their probabilities.

The counterpart of transformers' `pipeline("fill-mask")`, for lmforge encoders and Hugging Face
`BertForMaskedLM` folders, giving the same tokens and scores for the same folder:
- the text is encoded with the tokenizer's own template (BERT's `[CLS] … [SEP]`; lmforge's
  tokenizers have none, as the windows MLM pretraining reads have none);
- one forward pass; each mask's scores are a softmax over the whole vocabulary, taken on its own
  (several masks are scored independently, not jointly), special tokens included, as the
  pipeline does;
- token strings are the tokenizer's decoding of the single token.
This module knows models and tokenizers, nothing of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Prediction:
    """One candidate for one mask; field names are the pipeline's."""

    token: int
    token_str: str
    score: float


def mask_spelling(tokenizer) -> str:
    """How the text spells the mask: the tokenizer's own mask token ("[MASK]", "<mask>")."""
    if tokenizer.mask_id is None:
        raise LmforgeError("the tokenizer has no mask token: this model was not trained to fill masks")
    return tokenizer.id_to_token(tokenizer.mask_id)


def check_masked_lm(model, source: str = "the model") -> None:
    """Only an encoder with a token head fills masks; a decoder predicts the next token instead."""
    config = model.config
    if config.arch != "encoder":
        raise LmforgeError(f"{source} is a {config.arch} model; fill-mask needs an encoder trained with masked LM "
                           "(lmforge pretrain --arch encoder, or a BertForMaskedLM folder)")
    if config.n_labels:
        raise LmforgeError(f"{source} is a sequence classifier; fill-mask needs an encoder trained with masked LM")


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise LmforgeError(f"top_k must be at least 1; got {top_k}")


def encode(tokenizer, text: str) -> list[int]:
    """The text's ids with the tokenizer's template (one text: segment 0 throughout, the model's default).

    A byte-level BPE token carries the space before its word ("Ġfox"), and masked LM masks such
    whole tokens, so a mask stands for the word and its space: " <mask>" is read as "<mask>", as
    RoBERTa's tokenizer does (its <mask> strips the space on its left; lmforge's does not)."""
    from tokenizers import pre_tokenizers

    spelling = mask_spelling(tokenizer)
    mask_token = tokenizer.inner.get_added_tokens_decoder()[tokenizer.mask_id]
    if isinstance(tokenizer.inner.pre_tokenizer, pre_tokenizers.ByteLevel) and not mask_token.lstrip:
        text = text.replace(" " + spelling, spelling)
    return tokenizer.inner.encode(text, add_special_tokens=True).ids


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """For each mask token in `text`, in order: the top_k tokens, most likely first."""
    _check_top_k(top_k)
    check_masked_lm(model)
    spelling = mask_spelling(tokenizer)
    ids = encode(tokenizer, text)
    input_ids = torch.tensor([ids])
    where = (input_ids[0] == tokenizer.mask_id).nonzero().squeeze(-1)
    if len(where) == 0:
        raise LmforgeError(f"no {spelling} in the text: write {spelling} where a token should be predicted")
    if len(ids) > model.config.block_size:
        raise LmforgeError(f"the text is {len(ids)} tokens; the model reads at most {model.config.block_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off, as in any inference
    logits = model(input_ids.to(device)).logits
    model.train(was_training)
    probs = logits[0, where.to(device)].float().softmax(dim=-1)
    scores, tokens = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [Prediction(token, tokenizer.inner.decode([token], skip_special_tokens=False), score)
         for token, score in zip(row_tokens, row_scores, strict=True)]
        for row_tokens, row_scores in zip(tokens.tolist(), scores.tolist(), strict=True)
    ]


def fill_mask_folder(folder: str | Path, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """fill_mask with a model folder (lmforge's, or a Hugging Face BertForMaskedLM one)."""
    from lmforge.model_folder import load_model

    _check_top_k(top_k)  # before the model is loaded: a bad number costs nothing
    model, tokenizer = load_model(folder)
    check_masked_lm(model, str(folder))
    return fill_mask(model, tokenizer, text, top_k)
