"""GPT-2 (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`): a pre-norm decoder with learned
positions and fused q/k/v.

Its linear layers are `Conv1D`s, which store weights as (in, out): every one is transposed. The
classifier's `score` is a plain `nn.Linear` without bias, (labels, n_embd) as ours: copied as is.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.config import ModelConfig
from lmforge.interop.mapping import (
    CLASSIC_LAYOUT,
    TRANSPOSE,
    BlockNames,
    Family,
    HFConfig,
    Param,
    activation_to_hf,
    block_params,
    classifier_labels,
    linear,
    plain_attention,
    require,
)

LM, CLASSIFIER = "GPT2LMHeadModel", "GPT2ForSequenceClassification"

DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "problem_type": None,
    "num_labels": 2,
}

BLOCK = BlockNames(
    qkv=("attn.c_attn",), attn_out="attn.c_proj", attn_norm="ln_1", up="mlp.c_fc", down="mlp.c_proj", ffn_norm="ln_2"
)


def config_from_hf(hf: HFConfig, architecture: str) -> dict:
    hf.expect("add_cross_attention", False)
    hf.expect("scale_attn_weights", True)
    # reorder_and_upcast_attn only reorders the same fp32 arithmetic (and upcasts under autocast): accepted
    # The classifier pools the rightmost token that is not pad_token_id, ours the rightmost the mask keeps:
    # the same token unless a text itself ends in the pad token (GPT-2's eos often is it, but its tokenizer
    # adds none). Left padding also needs HF given position_ids, as generation does.
    return dict(
        **CLASSIC_LAYOUT,
        arch="decoder",
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        d_ff=hf["n_inner"],
        activation=hf.activation("activation_function"),
        norm_eps=hf["layer_norm_epsilon"],
        norm_position="pre",
        dropout=hf["resid_pdrop"],
        attn_dropout=hf["attn_pdrop"],
        tie_embeddings=hf["tie_word_embeddings"],
        scale_attn_by_inverse_layer_idx=hf["scale_attn_by_inverse_layer_idx"],
        init_std=hf["initializer_range"],
        n_labels=classifier_labels(hf) if architecture == CLASSIFIER else None,
    )


def config_to_hf(config: ModelConfig) -> dict:
    require(
        config, "GPT-2", position=("learned",), norm=("layernorm",), norm_position=("pre",), bias=(True,),
        n_kv_head=plain_attention(config), dense_connections=(False,), type_vocab_size=(0,),
        embedding_norm=(False,), scale_embedding=(False,), lm_head_bias=(False,),
    )
    return {
        "architectures": [CLASSIFIER if config.n_labels else LM],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.ffn_width,
        "activation_function": activation_to_hf(config, "GPT-2"),
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "initializer_range": config.init_std,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": config.tie_embeddings,
    }


def params(config: ModelConfig) -> Iterator[Param]:
    yield Param("token_embedding.weight", ("transformer.wte.weight",))
    yield Param("decoder_embed.positions.weight", ("transformer.wpe.weight",))
    for i in range(config.n_layer):
        yield from block_params(f"decoder.blocks.{i}", f"transformer.h.{i}", BLOCK, TRANSPOSE)
    yield from linear("decoder.final_norm", "transformer.ln_f")
    if config.n_labels:
        yield Param("head.out.weight", ("score.weight",))
    elif not config.tie_embeddings:
        yield Param("head.proj.weight", ("lm_head.weight",))


FAMILY = Family("gpt2", (LM, CLASSIFIER), DEFAULTS, config_from_hf, config_to_hf, params, generative=True)
