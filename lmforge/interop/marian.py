"""MarianMT (`MarianMTModel`): the family of most open translation models (Opus-MT), both ways.

It is BART's shape (post-norm blocks, the same layer names, final_logits_bias) with four
differences, each a core option: sinusoidal positions that are not stored and not interleaved
(`sinusoidal_halves`: all sines, then all cosines; positions start at 0, not 2), no LayerNorm on
the embeddings, token vectors scaled by sqrt(d) (`scale_embedding`, on in every Opus-MT model),
"swish" activations (`silu`), and optionally a target vocabulary of its own
(`share_encoder_decoder_embeddings: false` → `decoder_vocab_size`: a second token table that the
decoder reads and the head is tied to). Tokenizers are SentencePiece (`source.spm`,
`target.spm`, `vocab.json`): lmforge/spm.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.config import ModelConfig
from lmforge.interop.bart import DECODER_BLOCK, ENCODER_BLOCK, NORM_EPS, family_fields, family_fields_to_hf
from lmforge.interop.mapping import (
    ROW,
    Family,
    HFConfig,
    Param,
    activation_to_hf,
    block_params,
    plain_attention,
    require,
)

SILU = ("swish", "silu")  # Opus-MT's activation (GPT-2, BERT and BART imports keep refusing it)

DEFAULTS = {  # MarianConfig's defaults
    "vocab_size": 58101,
    "decoder_vocab_size": None,
    "max_position_embeddings": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "activation_function": "gelu",
    "d_model": 1024,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "init_std": 0.02,
    "scale_embedding": False,
    "share_encoder_decoder_embeddings": True,
    "tie_word_embeddings": True,
    "normalize_before": False,
    "pad_token_id": 58100,
    "eos_token_id": 0,
    "bos_token_id": None,
    "decoder_start_token_id": 58100,
}


def config_from_hf(hf: HFConfig, architecture: str) -> dict:
    # untied, the head is a third table; the core ties its head to the decoder's table
    hf.expect("tie_word_embeddings", True)
    hf.expect("normalize_before", False)  # no Opus-MT model is pre-norm; transformers ignores the field anyway
    separate = not hf["share_encoder_decoder_embeddings"]
    return dict(
        **family_fields(hf),
        norm="layernorm",
        position="sinusoidal",
        sinusoidal_halves=True,
        bias=True,
        decoder_vocab_size=(hf["decoder_vocab_size"] or hf["vocab_size"]) if separate else None,
        activation="silu" if hf["activation_function"] in SILU else hf.activation("activation_function"),
        embedding_norm=False,
    )


def config_to_hf(config: ModelConfig) -> dict:
    require(
        config, "Marian", position=("sinusoidal",), sinusoidal_halves=(True,), norm=("layernorm",),
        norm_eps=(NORM_EPS,), norm_position=("post",), bias=(True,), n_kv_head=plain_attention(config),
        dense_connections=(False,), type_vocab_size=(0,), embedding_norm=(False,), tie_embeddings=(True,),
        scale_attn_by_inverse_layer_idx=(False,),
    )
    return {
        "architectures": ["MarianMTModel"],
        **family_fields_to_hf(config),
        "decoder_vocab_size": config.target_vocab_size,
        "share_encoder_decoder_embeddings": config.decoder_vocab_size is None,
        "activation_function": "swish" if config.activation == "silu" else activation_to_hf(config, "Marian"),
        "normalize_before": False,
        "forced_eos_token_id": None,  # Marian's default (0) would force EOS at max_length; lmforge forces nothing
    }


def params(config: ModelConfig) -> Iterator[Param]:
    if config.decoder_vocab_size is None:
        yield Param("token_embedding.weight", ("model.shared.weight",))
    else:
        yield Param("token_embedding.weight", ("model.encoder.embed_tokens.weight",))
        yield Param("decoder_token_embedding.weight", ("model.decoder.embed_tokens.weight",))
    # positions are a fixed table on both sides: nothing stored
    for i in range(config.n_layer):
        yield from block_params(f"encoder.blocks.{i}", f"model.encoder.layers.{i}", ENCODER_BLOCK)
    for i in range(config.decoder_layers):
        yield from block_params(f"decoder.blocks.{i}", f"model.decoder.layers.{i}", DECODER_BLOCK)
    if config.lm_head_bias:
        yield Param("head.proj.bias", ("final_logits_bias",), ROW, optional=True)


FAMILY = Family("marian", ("MarianMTModel",), DEFAULTS, config_from_hf, config_to_hf, params, generative=True)
