"""Hugging Face interop: parity is the contract.

Randomly initialised transformers models (small configs with non-default options, nothing
downloaded) are saved, converted, and must give the same logits (1e-4, fp32, padded inputs), the
same greedy tokens as `generate`, and export back into folders transformers loads and agrees with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.interop import from_hf, is_hf_folder, to_hf
from lmforge.model import LanguageModel, SequenceClassifier, build_model
from lmforge.model_folder import load_model, save_model
from lmforge.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4
VOCAB = 300
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x + 1\n" * 20]
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
GPT2_VARIANTS = {  # every field off its default somewhere; "main" is the one generation runs on
    "main": dict(activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True, n_inner=80,
                 layer_norm_epsilon=1e-3, reorder_and_upcast_attn=True),
    "gelu-untied": dict(activation_function="gelu", tie_word_embeddings=False),
    "relu": dict(activation_function="relu", scale_attn_by_inverse_layer_idx=True),
}


def _perturb(model) -> None:
    """Random biases and norm gains, so that forgetting to copy one (or copying it to the wrong
    place) shows in the logits; transformers initialises them to 0 and 1."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name.lower() or ".ln_" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name == "final_logits_bias":
                b.copy_(torch.randn(b.shape, generator=gen))


def _save(hf_model, folder, tokenizer: Tokenizer):
    hf_model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def _build(cls, config, folder, tokenizer, adjust=None):
    torch.manual_seed(0)
    model = cls(config).eval()
    _perturb(model)
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    return model, _save(model, folder, tokenizer)


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return Tokenizer.train("bpe", TEXTS, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, gpt2_tok):
    """{variant: (hf model, folder)}"""
    out = {}
    for name, options in GPT2_VARIANTS.items():
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
            initializer_range=0.5, **options,  # large weights: greedy output varies instead of repeating one token
        )
        out[name] = _build(transformers.GPT2LMHeadModel, config, tmp_path_factory.mktemp(f"gpt2-{name}"), gpt2_tok)
    return out


def wordpiece(text: str) -> RustTokenizer:
    """A WordPiece tokenizer built by hand: BERT's normaliser, pre-tokeniser and specials ([PAD]
    0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4), the words of `text`, and single-letter pieces."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(text.split()))]
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(words[:5])
    return tokenizer


@pytest.fixture(scope="module")
def bert_tok() -> Tokenizer:
    return Tokenizer(wordpiece(" ".join(TEXTS)))


def _bert_config(**options):
    return transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, type_vocab_size=3, initializer_range=0.1, **options,
    )


BERT_MLM_VARIANTS = {  # untied, the logits' bias is decoder.bias, no longer an alias of cls.predictions.bias
    "main": dict(hidden_act="gelu_new", layer_norm_eps=1e-3),
    "untied": dict(hidden_act="gelu", tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def bert_mlm_variants(tmp_path_factory, bert_tok):
    return {
        name: _build(transformers.BertForMaskedLM, _bert_config(**options), tmp_path_factory.mktemp("bert"), bert_tok)
        for name, options in BERT_MLM_VARIANTS.items()
    }


@pytest.fixture(scope="module")
def bert_mlm(bert_mlm_variants):
    return bert_mlm_variants["main"]


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory, bert_tok):
    config = _bert_config(hidden_act="relu", num_labels=3)
    return _build(transformers.BertForSequenceClassification, config, tmp_path_factory.mktemp("bert-cls"), bert_tok)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    tokenizer = Tokenizer.train("bpe", TEXTS, vocab_size=VOCAB, special_tokens=BART_SPECIALS)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=48, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=80, max_position_embeddings=64,
        scale_embedding=True, init_std=0.15, forced_eos_token_id=None,
    )

    def adjust(model):
        """A random tied post-norm decoder mostly copies its last token; loud positions (and a
        milder logits bias) make its greedy output move, so that generation is a real test."""
        for side in (model.model.encoder, model.model.decoder):
            side.embed_positions.weight.mul_(20.0)
        model.final_logits_bias.mul_(0.1)

    return _build(transformers.BartForConditionalGeneration, config, tmp_path_factory.mktemp("bart"), tokenizer, adjust)


def _ids(batch: int, length: int, vocab: int = VOCAB, seed: int = 0, low: int = 5) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padding(lengths: list[int], width: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def _gpt2_logits(model, ids, mask, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        if hf:  # as HF generate does: positions count real tokens, so left padding starts at 0
            return model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        return model(ids, attention_mask=mask).logits


def _greedy(model, prompts: list[list[int]], eos: int, pad: int, n: int = 20) -> torch.Tensor:
    steps = decode_steps(model, prompts, GenerationConfig(temperature=0, max_new_tokens=n), eos_id=eos, pad_id=pad)
    return torch.tensor([tokens for tokens, _ in steps]).T


# =========================================================================== GPT-2


@pytest.mark.parametrize("variant", list(GPT2_VARIANTS))
def test_gpt2_logits_match_with_left_padding(gpt2, variant):
    hf, folder = gpt2[variant]
    model, _ = from_hf(folder)
    ids, mask = _ids(3, 20), _padding([20, 13, 6], 20, left=True)
    ref = _gpt2_logits(hf, ids, mask, hf=True)
    ours = _gpt2_logits(model, ids, mask, hf=False)
    real = mask.bool()
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    assert (model.head.proj.weight is model.token_embedding.weight) == hf.config.tie_word_embeddings


def test_gpt2_options_reach_the_model(gpt2):
    """The non-default options are really read: the converted configs differ where HF's do."""
    main_cfg = from_hf(gpt2["main"][1])[0].config
    assert (main_cfg.activation, main_cfg.d_ff, main_cfg.norm_eps) == ("gelu_tanh", 80, 1e-3)
    assert main_cfg.scale_attn_by_inverse_layer_idx and main_cfg.tie_embeddings
    untied = from_hf(gpt2["gelu-untied"][1])[0].config
    assert (untied.activation, untied.tie_embeddings, untied.scale_attn_by_inverse_layer_idx) == ("gelu", False, False)
    assert from_hf(gpt2["relu"][1])[0].config.activation == "relu"


def test_gpt2_greedy_generation_matches_transformers(gpt2):
    hf, folder = gpt2["main"]
    model, _ = from_hf(folder)
    prompt = _ids(1, 7, seed=3)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                      pad_token_id=0)
    assert len(set(ref[0, 7:].tolist())) >= 5  # the output moves: a real test of the decoding loop
    torch.testing.assert_close(_greedy(model, prompt.tolist(), eos=0, pad=0), ref[:, 7:], atol=0, rtol=0)

    rows = [_ids(1, n, seed=10 + n)[0].tolist() for n in (9, 4, 6)]
    mask = _padding([len(r) for r in rows], 9, left=True)
    ids = torch.zeros(3, 9, dtype=torch.long)
    ids[mask.bool()] = torch.tensor([t for r in rows for t in r])
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    torch.testing.assert_close(_greedy(model, rows, eos=0, pad=0), ref[:, 9:], atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["main", "gelu-untied"])
def test_gpt2_export_loads_in_transformers_and_matches(gpt2, variant, tmp_path):
    hf, folder = gpt2[variant]
    model, tokenizer = from_hf(folder)
    to_hf(model, tokenizer, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    ids, mask = _ids(2, 16, seed=4), _padding([16, 9], 16, left=True)
    real = mask.bool()
    ref = _gpt2_logits(hf, ids, mask, hf=True)
    torch.testing.assert_close(_gpt2_logits(back, ids, mask, hf=True)[real], ref[real], atol=ATOL, rtol=0)
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_exported_tokenizer_loads_with_autotokenizer(gpt2, tmp_path):
    model, tokenizer = from_hf(gpt2["main"][1])
    to_hf(model, tokenizer, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the lazy fox returns x + 1"
    assert auto(text)["input_ids"] == tokenizer.encode(text)
    assert auto.eos_token_id == tokenizer.eos_id == 0
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 0


def test_vocab_and_merges_and_pytorch_bin_without_tokenizer_json(gpt2, gpt2_tok, tmp_path):
    """A GPT-2 folder of the old kind: vocab.json + merges.txt, weights in pytorch_model.bin."""
    hf, folder = gpt2["main"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    gpt2_tok.inner.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]
    model, tokenizer = from_hf(tmp_path)
    text = "the quick brown fox"
    assert tokenizer.encode(text) == gpt2_tok.encode(text)
    assert tokenizer.eos_id == 0
    ids = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_sharded_safetensors_are_read(gpt2, tmp_path):
    from safetensors.torch import save_file

    hf, folder = gpt2["main"]
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, tmp_path / name)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = from_hf(tmp_path)
    ids = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


# =========================================================================== BERT


def _bert_inputs():
    ids, mask = _ids(3, 18, vocab=120), _padding([18, 11, 5], 18, left=False)
    segments = torch.zeros_like(ids)
    segments[:, 6:] = 1
    segments[0, 14:] = 2  # the third segment type exists only because type_vocab_size=3
    return ids, mask, segments


@pytest.mark.parametrize("variant", list(BERT_MLM_VARIANTS))
def test_bert_masked_lm_logits_match_with_segments_and_right_padding(bert_mlm_variants, variant):
    hf, folder = bert_mlm_variants[variant]
    model, tokenizer = from_hf(folder)
    assert isinstance(model, LanguageModel) and model.config.type_vocab_size == 3
    assert model.config.tie_embeddings == (variant == "main")
    assert model.config.mask_token_id == tokenizer.mask_id == 4 and model.config.pad_token_id == 0
    ids, mask, segments = _bert_inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=segments).logits
        ours = model(ids, attention_mask=mask, token_type_ids=segments).logits
        without_segments = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ref - without_segments)[real].abs().max() > 1e-2  # segments matter in this test
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)


def test_bert_classifier_logits_and_loss_match(bert_cls, tmp_path):
    hf, folder = bert_cls
    model, _ = from_hf(folder)
    assert isinstance(model, SequenceClassifier) and model.config.n_labels == 3
    ids, mask, segments = _bert_inputs()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=segments, labels=labels)
        ours = model(ids, attention_mask=mask, token_type_ids=segments, labels=labels)
    assert ours.logits.shape == (3, 3)
    torch.testing.assert_close(ours.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, ref.loss, atol=ATOL, rtol=0)

    save_model(model, tmp_path / "lm", _)  # lmforge's own folder keeps the classifier head
    again, _ = load_model(tmp_path / "lm")
    assert isinstance(again, SequenceClassifier)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, segments).logits, ours.logits, atol=0, rtol=0)


@pytest.mark.parametrize("which", ["main", "untied", "cls"])
def test_bert_export_loads_in_transformers_and_matches(bert_mlm_variants, bert_cls, which, tmp_path):
    hf, folder = bert_cls if which == "cls" else bert_mlm_variants[which]
    model, tokenizer = from_hf(folder)
    to_hf(model, tokenizer, tmp_path)
    auto = transformers.AutoModelForSequenceClassification if which == "cls" else transformers.AutoModelForMaskedLM
    back = auto.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    ids, mask, segments = _bert_inputs()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=segments).logits
        got = back(ids, attention_mask=mask, token_type_ids=segments).logits
    real = slice(None) if which == "cls" else mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)
    assert not (tmp_path / "generation_config.json").exists()


# =========================================================================== BART


def test_bart_logits_match_with_padded_source(bart):
    hf, folder = bart
    model, _ = from_hf(folder)
    assert model.config.scale_embedding and model.config.lm_head_bias
    src, mask = _ids(3, 15, seed=5), _padding([15, 8, 3], 15, left=False)
    src[~mask.bool()] = 1
    target = _ids(3, 10, seed=6)
    target[:, 0] = 2
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=target).logits
        ours = model(src, attention_mask=mask, decoder_input_ids=target).logits
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_bart_greedy_generation_matches_transformers(bart):
    hf, folder = bart
    model, _ = from_hf(folder)
    assert model.config.decoder_start_token_id == hf.generation_config.decoder_start_token_id == 2
    rows = [_ids(1, n, seed=20 + n)[0].tolist() for n in (11, 5)]
    mask = _padding([11, 5], 11, left=False)
    src = torch.ones(2, 11, dtype=torch.long)
    src[mask.bool()] = torch.tensor([t for r in rows for t in r])
    for batch, m, prompts in [(src[:1], mask[:1], rows[:1]), (src, mask, rows)]:
        ref = hf.generate(batch, attention_mask=m, do_sample=False, max_new_tokens=20)
        assert ref[0, 0] == 2 and len(set(ref[0].tolist())) >= 5
        torch.testing.assert_close(_greedy(model, prompts, eos=2, pad=1), ref[:, 1:], atol=0, rtol=0)


def test_bart_export_loads_in_transformers_and_matches(bart, tmp_path):
    hf, folder = bart
    model, tokenizer = from_hf(folder)
    to_hf(model, tokenizer, tmp_path)
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    src, target = _ids(2, 12, seed=7), _ids(2, 9, seed=8)
    with torch.no_grad():
        ref = hf(input_ids=src, decoder_input_ids=target).logits
        torch.testing.assert_close(back(input_ids=src, decoder_input_ids=target).logits, ref, atol=ATOL, rtol=0)
    ref = hf.generate(src[:1], do_sample=False, max_new_tokens=20)
    torch.testing.assert_close(back.generate(src[:1], do_sample=False, max_new_tokens=20), ref, atol=0, rtol=0)


# =========================================================================== lmforge models out


NATIVE = {  # models as lmforge builds them, in the shape each family can express (learned positions)
    "GPT2LMHeadModel": dict(arch="decoder", activation="gelu", norm_eps=1e-6),
    "BertForMaskedLM": dict(arch="encoder", norm_position="post", embedding_norm=True, type_vocab_size=2,
                            activation="relu", tie_embeddings=False),
    "BertForSequenceClassification": dict(arch="encoder", norm_position="post", embedding_norm=True,
                                          type_vocab_size=1, n_labels=4),
    "BartForConditionalGeneration": dict(arch="encoder-decoder", norm_position="post", embedding_norm=True,
                                         n_decoder_layer=3, d_ff=72, lm_head_bias=True, eos_token_id=2),
}


@pytest.mark.parametrize("architecture", list(NATIVE))
def test_lmforge_models_export_to_transformers(architecture, tmp_path):
    """Not only round trips: a model lmforge built itself exports, and transformers agrees with it."""
    torch.manual_seed(0)
    shape = dict(vocab_size=90, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.2, position="learned")
    config = ModelConfig(**shape, **NATIVE[architecture])
    model = build_model(config).eval()
    _perturb(model)
    to_hf(model, None, tmp_path)
    back = getattr(transformers, architecture).from_pretrained(tmp_path).eval()
    ids, mask = _ids(2, 12, vocab=90), _padding([12, 7], 12, left=config.arch == "decoder")
    with torch.no_grad():
        if config.arch == "decoder":
            ref = _gpt2_logits(back, ids, mask, hf=True)
            ours = model(ids, attention_mask=mask).logits
        elif config.arch == "encoder":
            ref = back(ids, attention_mask=mask).logits
            ours = model(ids, attention_mask=mask).logits
        else:
            target = _ids(2, 6, vocab=90, seed=1)
            ref = back(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
            ours = model(ids, attention_mask=mask, decoder_input_ids=target).logits
    real = mask.bool() if ref.dim() == 3 and config.arch != "encoder-decoder" else slice(None)
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    if config.arch == "encoder-decoder":
        assert back.generation_config.decoder_start_token_id == 2  # lmforge's fallback, spelled out


# =========================================================================== refusals


def _edited(folder, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


@pytest.mark.parametrize(
    "family, changes, field",
    [
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
        ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
        ("gpt2", {"activation_function": "silu"}, "activation_function"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("bert", {"is_decoder": True}, "is_decoder"),
        ("bert", {"architectures": ["BertForTokenClassification"]}, "architectures"),
        ("bart", {"decoder_attention_heads": 2}, "decoder_attention_heads"),
        ("bart", {"tie_word_embeddings": False}, "tie_word_embeddings"),
        ("bart", {"model_type": "t5"}, "model_type"),
    ],
)
def test_unsupported_fields_are_refused_by_name(gpt2, bert_mlm, bart, tmp_path, family, changes, field):
    folder = {"gpt2": gpt2["main"][1], "bert": bert_mlm[1], "bart": bart[1]}[family]
    edited = _edited(folder, tmp_path, **changes)
    with pytest.raises(LmforgeError, match=field):
        from_hf(edited)


def test_broken_folders_are_one_line_errors(gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _edited(gpt2["main"][1], tmp_path, n_embd=64)
    with pytest.raises(LmforgeError, match="weights do not match config.json"):
        from_hf(folder)
    folder = _edited(gpt2["main"][1], tmp_path / "b")
    state = load_file(folder / "model.safetensors")
    del state["transformer.h.1.ln_2.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match=r"no weight transformer\.h\.1\.ln_2\.weight"):
        from_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="has no weights"):
        from_hf(folder)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(position="rope"), "position"),
        (dict(norm="rmsnorm"), "norm"),
        (dict(activation="swiglu"), "activation"),
        (dict(n_kv_head=2), "n_kv_head"),
        (dict(arch="encoder", norm_position="pre"), "norm_position"),
        (dict(arch="encoder-decoder", norm_position="post", embedding_norm=True, norm_eps=1e-6), "norm_eps"),
    ],
)
def test_export_refuses_what_the_family_cannot_express(options, field, tmp_path):
    config = ModelConfig(**{"vocab_size": 50, "block_size": 16, "n_layer": 1, "n_head": 4, "n_embd": 32,
                            "position": "learned", **options})
    with pytest.raises(LmforgeError, match=field):
        to_hf(LanguageModel(config), None, tmp_path)


def test_n_labels_needs_an_encoder_or_a_decoder():
    with pytest.raises(LmforgeError, match="n_labels .* needs arch encoder or decoder; got 'encoder-decoder'"):
        ModelConfig(arch="encoder-decoder", n_labels=3)
    assert ModelConfig(arch="decoder", n_labels=3).pooling_mode == "last"
    with pytest.raises(LmforgeError, match="pooling cls needs an encoder"):
        ModelConfig(arch="decoder", n_labels=3, pooling="cls")


# =========================================================================== CLI and load_model


def test_cli_convert_both_ways(gpt2, tmp_path, capsys):
    hf, folder = gpt2["main"]
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "lm")]) == 0
    assert not is_hf_folder(tmp_path / "lm") and is_hf_folder(folder)
    model, _ = load_model(tmp_path / "lm")
    assert main(["convert", "--to-hf", str(tmp_path / "lm"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(2, 10, seed=9)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(ids).logits, ref, atol=ATOL, rtol=0)
    assert "lm" in capsys.readouterr().out

    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "lm")]) == 2  # never mixes folders
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_convert_refusal_is_one_line_exit_2(bert_mlm, tmp_path, capsys):
    edited = _edited(bert_mlm[1], tmp_path, position_embedding_type="relative_key")
    assert main(["convert", "--from-hf", str(edited), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "position_embedding_type='relative_key'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_generate_and_eval_accept_an_hf_folder(gpt2, gpt2_tok, tmp_path, capsys):
    hf, folder = gpt2["main"]
    prompt = "the quick brown"
    ids = torch.tensor([gpt2_tok.encode(prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0)
    expected = gpt2_tok.decode(ref[0, ids.shape[1] :])
    args = ["generate", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == expected

    (tmp_path / "text.txt").write_text(TEXTS[0])
    assert main(["eval", str(folder), "--data", str(tmp_path / "text.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_cli_eval_of_a_classifier_needs_labelled_rows(bert_cls, tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXTS[0])
    assert main(["eval", str(bert_cls[1]), "--data", str(tmp_path / "text.txt")]) == 2
    assert "no label column (looked for label, labels); name it with --label-column" in capsys.readouterr().err


def test_transformers_is_not_imported_by_lmforge():
    code = (
        "import sys, lmforge, lmforge.cli, lmforge.train.checkpoint, lmforge.model_folder, lmforge.interop\n"
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
