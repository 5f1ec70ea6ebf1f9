"""Tiny random model folders for the evaluation and insight tests (test_eval_*, test_insight*,
test_harness, test_model_card): built in well under a second, every family, fp32."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import ENGLISH

from lmforge.config import ModelConfig
from lmforge.model.transformer import LanguageModel
from lmforge.model_folder import save_model
from lmforge.tokenize import Tokenizer

SENTIMENT = [("a great film , i loved it", 1), ("a terrible film , i hated it", 0),
             ("great acting and a great story", 1), ("boring and terrible", 0),
             ("the best film of the year", 1), ("the worst film of the year", 0)]


def bpe_tokenizer() -> Tokenizer:
    words = " ".join(text for text, _ in SENTIMENT) + " Review: Sentiment: great terrible Question: Answer:"
    return Tokenizer.train("bpe", [ENGLISH, words * 5], vocab_size=320)


def tiny_model(tokenizer: Tokenizer, arch: str = "decoder", seed: int = 0, **overrides) -> LanguageModel:
    config = dict(arch=arch, vocab_size=tokenizer.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                  init_std=0.2, tie_embeddings=False, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                  mask_token_id=tokenizer.mask_id, bos_token_id=tokenizer.bos_id,
                  decoder_start_token_id=tokenizer.eos_id)
    config.update(overrides)
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(**config)).eval()


def tiny_folder(folder: Path, arch: str = "decoder", seed: int = 0, **overrides) -> Path:
    tokenizer = bpe_tokenizer()
    save_model(tiny_model(tokenizer, arch, seed, **overrides), folder, tokenizer)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


CHOICES = [
    {"context": "The quick brown fox", "choices": ["jumps over the lazy dog.", "sleeps", "is not gold"], "label": 0},
    {"context": "A stitch in time", "choices": ["saves nine.", "glitters"], "label": 0},
    {"context": "All that glitters is", "choices": ["the sun", "not gold.", "nine", "a dog"], "label": 1},
    {"context": "The dog sleeps in the ", "choices": ["sun.", "fox"], "label": 0},
]
