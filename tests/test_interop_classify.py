"""Sequence classifiers across the Hugging Face border: GPT2ForSequenceClassification converts both
ways (BertForSequenceClassification already does, see test_interop.py), and `lmforge predict` on a
classifier folder gives the labels and probabilities of transformers' text-classification pipeline.

GPT-2's classifier reads the rightmost token that is not `pad_token_id`, lmforge's the rightmost one
the attention mask keeps: they are compared where both define the same token (unpadded texts, and
right-padded batches whose padding is pad_token_id). Label names are not LABEL_i, so a label read in
the wrong order shows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_interop import _ids, _padding, _perturb, wordpiece
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop import from_hf, hf_task, to_hf
from lmforge.model import SequenceClassifier, build_model
from lmforge.model_folder import load_model, save_model
from lmforge.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-5
VOCAB = 300
LABELS = ["negative", "neutral", "positive"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 20,
    "a dull film with a lovely cast and a superb plot. " * 20,
]
TEXTS = ["the quick brown fox", "a lovely film", "the lazy dog jumps over a dull plot, and the fox", "superb"]
PAIRS = [("the quick brown fox", "the lazy dog"), ("a superb cast", "a dull plot with a lovely fox")]


def _named(labels: list[str]) -> dict:
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def _classifier_folder(hf_model, hf_tokenizer, folder):
    """A folder as transformers writes it: save_pretrained of the model and of its tokenizer."""
    hf_model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return hf_model, folder


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return Tokenizer.train("bpe", CORPUS, vocab_size=VOCAB)  # <|endoftext|> 0, <pad> 1, <mask> 2


@pytest.fixture(scope="module")
def gpt2_cls(tmp_path_factory, gpt2_tok):
    """(hf model, folder) of a GPT2ForSequenceClassification whose pad_token_id is the tokenizer's <pad>."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4, n_inner=80, activation_function="gelu_new",
        layer_norm_epsilon=1e-3, initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=gpt2_tok.pad_id,
        **_named(LABELS),
    )
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    _perturb(model)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer.from_str(gpt2_tok.to_json()), eos_token="<|endoftext|>", pad_token="<pad>")
    return _classifier_folder(model, tokenizer, tmp_path_factory.mktemp("gpt2-cls"))


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    """(hf model, folder) of a BertForSequenceClassification whose tokenizer adds [CLS] a [SEP] b [SEP]."""
    inner = wordpiece(" ".join(CORPUS).replace(".", " "))
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    config = transformers.BertConfig(
        vocab_size=inner.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, initializer_range=0.3, hidden_act="gelu_new",
        **_named(LABELS),
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    _perturb(model)
    return _classifier_folder(model, transformers.BertTokenizerFast(tokenizer_object=inner),
                              tmp_path_factory.mktemp("bert-cls"))


def _right_padded(batch: int, width: int, lengths: list[int], pad_id: int, vocab: int = VOCAB):
    """Random ids (never a special token) padded on the right with pad_id, and their mask."""
    ids, mask = _ids(batch, width, vocab=vocab, seed=width), _padding(lengths, width, left=False)
    ids[~mask.bool()] = pad_id
    return ids, mask


def _assert_same_logits(ours, theirs, ids, mask=None) -> None:
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1  # the logits say something: a misplaced weight would show


# =========================================================================== GPT-2 in


@pytest.mark.parametrize("how", ["in memory", "convert --from-hf"])
def test_gpt2_classifier_logits_match_unpadded_and_right_padded(gpt2_cls, gpt2_tok, how, tmp_path):
    hf, folder = gpt2_cls
    if how == "in memory":
        model, _ = from_hf(folder)
    else:
        assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "lm")]) == 0
        model, _ = load_model(tmp_path / "lm")
    assert isinstance(model, SequenceClassifier)
    assert (model.config.arch, model.config.n_labels, model.config.pad_token_id) == ("decoder", 3, gpt2_tok.pad_id)
    _assert_same_logits(model, hf, _ids(3, 12))
    _assert_same_logits(model, hf, *_right_padded(4, 16, [16, 11, 5, 1], gpt2_tok.pad_id))


def test_hf_task_reads_gpt2_label_names_in_order(gpt2_cls):
    assert hf_task(gpt2_cls[1]) == {"task": "classify", "labels": LABELS, "template": "tokenizer"}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"problem_type": "multi_label_classification"}, "problem_type"),
        ({"problem_type": "regression"}, "problem_type"),
        ({"num_labels": 1, "id2label": None, "label2id": None}, "num_labels"),
    ],
)
def test_classifiers_lmforge_cannot_express_are_refused_by_name(gpt2_cls, tmp_path, changes, field):
    folder = tmp_path / "edited"
    shutil.copytree(gpt2_cls[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(LmforgeError, match=field):
        from_hf(folder)


def test_predict_refusal_is_one_line(gpt2_cls, tmp_path, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(gpt2_cls[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    assert main(["predict", str(folder), "--text", "the fox"]) == 2
    err = capsys.readouterr().err.strip()
    assert "problem_type='multi_label_classification'" in err and len(err.splitlines()) == 1


# =========================================================================== lmforge out


def _lmforge_classifier(folder, tokenizer: Tokenizer, **options) -> SequenceClassifier:
    """An lmforge classifier folder (random weights, named labels, lmforge's own input template)."""
    config = ModelConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4, n_embd=32, init_std=0.3,
                         position="learned", n_labels=len(LABELS), pad_token_id=tokenizer.pad_id,
                         eos_token_id=tokenizer.eos_id, **options)
    torch.manual_seed(0)
    model = build_model(config).eval()
    _perturb(model)
    save_model(model, folder, tokenizer, task={"task": "classify", "labels": LABELS, "template": "lmforge"})
    return model


ENCODER = dict(arch="encoder", norm_position="post", embedding_norm=True, type_vocab_size=2, activation="relu")


def test_lmforge_decoder_classifier_exports_to_gpt2(gpt2_tok, tmp_path):
    model = _lmforge_classifier(tmp_path / "lm", gpt2_tok, arch="decoder")
    assert main(["convert", "--to-hf", str(tmp_path / "lm"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "GPT2ForSequenceClassification"
    assert back.config.id2label == dict(enumerate(LABELS)) and back.config.pad_token_id == gpt2_tok.pad_id
    _assert_same_logits(model, back, _ids(2, 10))
    _assert_same_logits(model, back, *_right_padded(3, 14, [14, 6, 2], gpt2_tok.pad_id))


@pytest.mark.parametrize("options", [dict(arch="decoder"), ENCODER], ids=["gpt2", "bert"])
def test_exported_classifier_in_the_pipeline_predicts_as_lmforge_did(gpt2_tok, tmp_path, capsys, options):
    """The exported tokenizer builds lmforge's template (`a <eos>`, `<eos> a <eos> b <eos>`) and hands
    BERT its segment ids, so transformers reads what the lmforge model was trained on."""
    _lmforge_classifier(tmp_path / "lm", gpt2_tok, **options)
    to_hf(*load_model(tmp_path / "lm"), tmp_path / "hf", task=json.loads((tmp_path / "lm/task.json").read_text()))
    inputs = TEXTS + (PAIRS if options["arch"] == "encoder" else [])
    _assert_predict_matches_pipeline(tmp_path / "lm", tmp_path / "hf", inputs, capsys)


@pytest.mark.parametrize(
    "options, task, field",
    [
        (dict(arch="decoder", pooling="mean"), {}, "pooling"),
        ({**ENCODER, "pooling": "mean"}, {}, "pooling"),
        (dict(arch="decoder", pad_token_id=0), {"template": "lmforge"}, "pad_token_id=0"),
        (dict(arch="decoder"), {"labels": ["a", "b"]}, "task.json names 2 labels"),
    ],
)
def test_export_refuses_what_a_classifier_family_cannot_express(gpt2_tok, tmp_path, options, task, field):
    config = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=4, n_embd=32, position="learned",
                         n_labels=3, eos_token_id=0, **options)
    with pytest.raises(LmforgeError, match=field):
        to_hf(build_model(config), gpt2_tok, tmp_path, task={"task": "classify", **task})


# =========================================================================== predict = pipeline


def _predict(folder, text, pair, capsys) -> list[dict]:
    assert main(["predict", str(folder), "--text", text, *(["--text-pair", pair] if pair else []), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["scores"]


def _assert_predict_matches_pipeline(folder, hf_folder, inputs, capsys) -> None:
    """`lmforge predict folder` on each text (or (text, pair)) = the pipeline on hf_folder, labels in order."""
    pipe = transformers.pipeline("text-classification", model=str(hf_folder), top_k=None)
    for item in inputs:
        text, pair = item if isinstance(item, tuple) else (item, None)
        expected = pipe({"text": text, "text_pair": pair} if pair else text)
        expected = expected[0] if isinstance(expected[0], list) else expected  # one input: one list of labels
        ours = _predict(folder, text, pair, capsys)
        assert [s["label"] for s in ours] == [s["label"] for s in expected], item
        torch.testing.assert_close([s["score"] for s in ours], [s["score"] for s in expected], atol=ATOL, rtol=0)
        assert expected[0]["score"] - expected[-1]["score"] > 0.05  # not uniform: the label order means something


@pytest.mark.parametrize("via", ["hf folder", "convert --from-hf"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_predict_on_a_converted_classifier_matches_the_pipeline(gpt2_cls, bert_cls, family, via, tmp_path, capsys):
    folder = {"gpt2": gpt2_cls, "bert": bert_cls}[family][1]
    ours = folder  # converted in memory as it loads
    if via == "convert --from-hf":
        ours = tmp_path / "lm"
        assert main(["convert", "--from-hf", str(folder), "--out", str(ours)]) == 0
        capsys.readouterr()
    inputs = TEXTS + (PAIRS if family == "bert" else [])
    _assert_predict_matches_pipeline(ours, folder, inputs, capsys)
