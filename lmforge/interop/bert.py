"""BERT (`BertForMaskedLM`, `BertForSequenceClassification`, `BertForQuestionAnswering`): a post-norm
encoder with learned positions, segment (token type) embeddings, a LayerNorm on the embeddings and separate q/k/v.

The masked-LM head is `cls.predictions` (dense, activation, LayerNorm, tied decoder + bias); the
classifier is the pooler (dense + tanh on [CLS]) then `classifier`; the QA model has no pooler,
only `qa_outputs` (a start and an end logit per token).
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.mapping import (
    CLASSIC_LAYOUT,
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

MASKED_LM, CLASSIFIER, QA = "BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering"

DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "is_decoder": False,
    "add_cross_attention": False,
    "position_embedding_type": "absolute",  # transformers 4.x configs carry it
    "tie_word_embeddings": True,
    "problem_type": None,
    "num_labels": 2,
}

BLOCK = BlockNames(
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    up="intermediate.dense",
    down="output.dense",
    ffn_norm="output.LayerNorm",
)


def config_from_hf(hf: HFConfig, architecture: str) -> dict:
    hf.expect("is_decoder", False)
    hf.expect("add_cross_attention", False)
    hf.expect("position_embedding_type", "absolute")
    n_labels = classifier_labels(hf) if architecture == CLASSIFIER else None
    if hf["type_vocab_size"] < 1:
        raise hf.refuse("type_vocab_size", "BERT needs at least 1")
    return dict(
        **CLASSIC_LAYOUT,
        arch="encoder",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        activation=hf.activation("hidden_act"),
        norm_eps=hf["layer_norm_eps"],
        norm_position="post",
        dropout=hf["hidden_dropout_prob"],
        attn_dropout=hf["attention_probs_dropout_prob"],
        tie_embeddings=hf["tie_word_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        embedding_norm=True,
        init_std=hf["initializer_range"],
        n_labels=n_labels,
        span_head=architecture == QA,
    )


def config_to_hf(config: ModelConfig) -> dict:
    require(
        config, "BERT", position=("learned",), norm=("layernorm",), norm_position=("post",), bias=(True,),
        n_kv_head=plain_attention(config), dense_connections=(False,), embedding_norm=(True,),
        scale_embedding=(False,), scale_attn_by_inverse_layer_idx=(False,),
    )
    if config.type_vocab_size < 1:
        raise LmforgeError("cannot export to BERT: type_vocab_size=0 (BERT always has segment embeddings)")
    hf = {
        "architectures": [CLASSIFIER if config.n_labels else QA if config.span_head else MASKED_LM],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.ffn_width,
        "hidden_act": activation_to_hf(config, "BERT"),
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "max_position_embeddings": config.block_size,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.init_std,
        "layer_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
    }
    return hf  # a classifier's id2label comes from its task.json (hf.to_hf)


def params(config: ModelConfig) -> Iterator[Param]:
    embeddings = "bert.embeddings"
    yield Param("token_embedding.weight", (f"{embeddings}.word_embeddings.weight",))
    yield Param("encoder_embed.positions.weight", (f"{embeddings}.position_embeddings.weight",))
    yield Param("encoder_embed.segments.weight", (f"{embeddings}.token_type_embeddings.weight",))
    yield from linear("encoder_embed.norm", f"{embeddings}.LayerNorm")
    for i in range(config.n_layer):
        yield from block_params(f"encoder.blocks.{i}", f"bert.encoder.layer.{i}", BLOCK)
    if config.span_head:
        yield from linear("head.out", "qa_outputs")
        return
    if config.n_labels:
        yield from linear("head.pool", "bert.pooler.dense")
        yield from linear("head.out", "classifier")
        return
    yield from linear("head.dense", "cls.predictions.transform.dense")
    yield from linear("head.norm", "cls.predictions.transform.LayerNorm")
    # The logits' bias is `decoder.bias`; tied checkpoints save only its alias `cls.predictions.bias`.
    # Read both (decoder.bias last, so it wins when the two differ); write both.
    yield Param("head.proj.bias", ("cls.predictions.bias",), optional=True)
    yield Param("head.proj.bias", ("cls.predictions.decoder.bias",), optional=True)
    if not config.tie_embeddings:
        yield Param("head.proj.weight", ("cls.predictions.decoder.weight",))


FAMILY = Family("bert", (MASKED_LM, CLASSIFIER, QA), DEFAULTS, config_from_hf, config_to_hf, params, generative=False)
