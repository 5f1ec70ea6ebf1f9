"""BART (`BartForConditionalGeneration`): the encoder-decoder family the core maps onto exactly.

Post-norm blocks, learned positions, a LayerNorm on each stack's embeddings, GELU, one token
table shared by encoder, decoder and head: all things the core already has. The extras are small:
position tables start at row 2 (sliced off), `scale_embedding` (token vectors times sqrt(d)) and
`final_logits_bias` (our `lm_head_bias`). Its LayerNorms always use eps 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.config import ModelConfig
from lmforge.interop.mapping import (
    CLASSIC_LAYOUT,
    ROW,
    BlockNames,
    Family,
    HFConfig,
    Param,
    activation_to_hf,
    block_params,
    linear,
    plain_attention,
    require,
    skip_rows,
)

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2
NORM_EPS = 1e-5  # nn.LayerNorm's default; BART has no field for it

DEFAULTS = {
    "vocab_size": 50265,
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
    "tie_word_embeddings": True,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}

_SELF = dict(
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.out_proj",
    attn_norm="self_attn_layer_norm",
    up="fc1",
    down="fc2",
    ffn_norm="final_layer_norm",
)
ENCODER_BLOCK = BlockNames(**_SELF)
DECODER_BLOCK = BlockNames(
    **_SELF,
    cross_qkv=("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"),
    cross_out="encoder_attn.out_proj",
    cross_norm="encoder_attn_layer_norm",
)


def config_from_hf(hf: HFConfig, architecture: str) -> dict:
    # untied, transformers keeps three tables (encoder, decoder, head); the core shares one
    hf.expect("tie_word_embeddings", True)
    return dict(**CLASSIC_LAYOUT, **family_fields(hf), activation=hf.activation("activation_function"),
                embedding_norm=True)


def family_fields(hf: HFConfig) -> dict:
    """What BART and the models built on its code (Marian) say alike, in lmforge's names."""
    return dict(
        arch="encoder-decoder",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["encoder_layers"],
        n_decoder_layer=hf["decoder_layers"],
        n_head=hf.same("decoder_attention_heads", "encoder_attention_heads"),
        n_embd=hf["d_model"],
        d_ff=hf.same("decoder_ffn_dim", "encoder_ffn_dim"),
        norm_eps=NORM_EPS,
        norm_position="post",
        dropout=hf["dropout"],
        attn_dropout=hf["attention_dropout"],
        tie_embeddings=True,
        scale_embedding=hf["scale_embedding"],
        lm_head_bias=True,
        init_std=hf["init_std"],
    )


def config_to_hf(config: ModelConfig) -> dict:
    require(
        config, "BART", position=("learned",), norm=("layernorm",), norm_eps=(NORM_EPS,), norm_position=("post",),
        bias=(True,), n_kv_head=plain_attention(config), dense_connections=(False,), type_vocab_size=(0,),
        embedding_norm=(True,), tie_embeddings=(True,), scale_attn_by_inverse_layer_idx=(False,),
    )
    return {"architectures": ["BartForConditionalGeneration"], **family_fields_to_hf(config),
            "activation_function": activation_to_hf(config, "BART"),
            "forced_eos_token_id": None}  # lmforge generation forces nothing; say so, or BART's default (2) applies


def family_fields_to_hf(config: ModelConfig) -> dict:
    """family_fields, the other way."""
    return {
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "encoder_layers": config.n_layer,
        "decoder_layers": config.decoder_layers,
        "encoder_attention_heads": config.n_head,
        "decoder_attention_heads": config.n_head,
        "encoder_ffn_dim": config.ffn_width,
        "decoder_ffn_dim": config.ffn_width,
        "d_model": config.n_embd,
        "dropout": config.dropout,
        "attention_dropout": config.attn_dropout,
        "init_std": config.init_std,
        "scale_embedding": config.scale_embedding,
        "tie_word_embeddings": True,
    }


def params(config: ModelConfig) -> Iterator[Param]:
    yield Param("token_embedding.weight", ("model.shared.weight",))
    for side in ("encoder", "decoder"):
        positions = f"model.{side}.embed_positions.weight"
        yield Param(f"{side}_embed.positions.weight", (positions,), skip_rows(POSITION_OFFSET))
        yield from linear(f"{side}_embed.norm", f"model.{side}.layernorm_embedding")
    for i in range(config.n_layer):
        yield from block_params(f"encoder.blocks.{i}", f"model.encoder.layers.{i}", ENCODER_BLOCK)
    for i in range(config.decoder_layers):
        yield from block_params(f"decoder.blocks.{i}", f"model.decoder.layers.{i}", DECODER_BLOCK)
    if config.lm_head_bias:
        yield Param("head.proj.bias", ("final_logits_bias",), ROW, optional=True)  # transformers may omit it


FAMILY = Family(
    "bart", ("BartForConditionalGeneration",), DEFAULTS, config_from_hf, config_to_hf, params, generative=True
)
