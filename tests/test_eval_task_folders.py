"""eval --task on task folders: classify, qa and translate through the registry, with intervals,
equal to the scores the fine-tuning and seq2seq code compute themselves."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import SENTIMENT, bpe_tokenizer, tiny_model, write_jsonl
from helpers import token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.evaluate.bootstrap import metric_interval
from lmforge.evaluate.metrics import chrf
from lmforge.finetune.predict import evaluate_file, load_task_model
from lmforge.model.classifier import build_model
from lmforge.model_folder import save_model


def task_folder(folder, **config):
    tokenizer = bpe_tokenizer()
    base = tiny_model(tokenizer, "encoder")
    torch.manual_seed(1)
    model = build_model(ModelConfig.from_dict({**base.config.to_dict(), **config})).eval()
    return model, tokenizer


def run_json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_classify_task_equals_the_fine_tuning_scores(tmp_path, capsys):
    model, tokenizer = task_folder(tmp_path, n_labels=2)
    save_model(model, tmp_path / "cls", tokenizer, task={"task": "classify", "labels": ["neg", "pos"],
                                                          "template": "lmforge"})
    rows = [{"sentence": t, "label": ["neg", "pos"][y]} for t, y in SENTIMENT * 3]
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    result = run_json(capsys, tmp_path / "cls", "--data", data, "--bootstrap", "200")
    folder_model, folder_tokenizer, task = load_task_model(tmp_path / "cls")
    own = evaluate_file(folder_model, folder_tokenizer, task, [str(data)])
    assert result["task"] == "classify" and result["examples"] == own["examples"] == len(rows)
    for key in ("accuracy", "macro_f1", "loss"):
        assert result[key] == pytest.approx(own[key], abs=1e-6)
        low, high = result["ci95"][key]
        assert low <= result[key] <= high
    assert run_json(capsys, tmp_path / "cls", "--data", data, "--limit", "4")["examples"] == 4


def test_qa_task_equals_the_fine_tuning_scores(tmp_path, capsys):
    model, tokenizer = task_folder(tmp_path, span_head=True)
    save_model(model, tmp_path / "qa", tokenizer, task={"task": "qa", "template": "lmforge", "doc_stride": 16,
                                                        "max_answer_tokens": 6})
    context = "the quick brown fox jumps over the lazy dog . the dog sleeps in the sun ."
    questions = [("what jumps ?", "brown fox"), ("where does the dog sleep ?", "in the sun"),
                 ("what is lazy ?", "the dog"), ("who sleeps ?", "dog")]
    squad = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": str(i), "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
        for i, (q, a) in enumerate(questions)]}]}]}
    (tmp_path / "val.json").write_text(json.dumps(squad))
    result = run_json(capsys, tmp_path / "qa", "--data", tmp_path / "val.json", "--bootstrap", "100")
    folder_model, folder_tokenizer, task = load_task_model(tmp_path / "qa")
    own = evaluate_file(folder_model, folder_tokenizer, task, [str(tmp_path / "val.json")])
    assert result["questions"] == own["questions"] == 4
    for key in ("exact_match", "f1"):
        assert result[key] == pytest.approx(own[key], abs=1e-9)
        low, high = result["ci95"][key]
        assert low <= result[key] <= high


def test_translate_task_intervals_resample_sentences(tmp_path, capsys):
    tokenizer = bpe_tokenizer()
    save_model(tiny_model(tokenizer, "encoder-decoder"), tmp_path / "mt", tokenizer)
    lines = [text for text, _ in SENTIMENT]
    (tmp_path / "src.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(reversed(lines)) + "\n")
    argv = [tmp_path / "mt", "--task", "translate", "--src", tmp_path / "src.txt", "--ref", tmp_path / "ref.txt",
            "--max-length", "8", "--limit", "5"]
    result = run_json(capsys, *argv, "--bootstrap", "100", "--seed", "3")
    assert result["sentences"] == 5 and "bleu_signature" in result
    assert main(["translate", str(tmp_path / "mt"), "--input", str(tmp_path / "src.txt"), "--max-length", "8"]) == 0
    hypotheses = capsys.readouterr().out.splitlines()[:5]
    references = list(reversed(lines))[:5]
    expected = metric_interval(lambda h, r: chrf(h, r)["score"], hypotheses, references, resamples=100, seed=3)
    assert result["chrf"] == pytest.approx(expected["value"])
    assert result["ci95"]["chrf"] == pytest.approx([expected["low"], expected["high"]])
