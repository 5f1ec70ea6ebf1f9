"""eval --task dispatch: perplexity with intervals, --limit, the progress bar, the table, and
zero/few-shot prompting (evaluate/tasks.py, evaluate/fewshot.py)."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import SENTIMENT, bpe_tokenizer, tiny_folder, tiny_model, write_jsonl
from helpers import ENGLISH, TINYSHAKESPEARE, one_line_error, token_cache, write_corpus  # noqa: F401

from lmforge.cli import main
from lmforge.evaluate.choice import loglikelihoods
from lmforge.evaluate.fewshot import build_prompts, draw_shots
from lmforge.evaluate.metrics import accuracy, macro_f1, squad_scores
from lmforge.evaluate.perplexity import evaluate_corpus
from lmforge.generate import GenerationConfig, generate
from lmforge.model_folder import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("eval") / "model")


def run_json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_intervals_contain_the_point_and_match_the_plain_pass(folder, tmp_path, capsys):
    data = write_corpus(tmp_path, TINYSHAKESPEARE.read_text(encoding="utf-8")[:1500])  # windows that differ
    result = run_json(capsys, folder, "--data", data, "--bootstrap", "300", "--batch-size", "4")
    model, tokenizer = load_model(folder)
    plain = evaluate_corpus(model, tokenizer, [str(data)], batch_size=4)  # the loss-only path
    assert result["task"] == "perplexity" and result["tokens"] == plain["tokens"]
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert result[key] == pytest.approx(plain[key], rel=1e-5)
        low, high = result["ci95"][key]
        assert low <= result[key] <= high and low < high
    again = run_json(capsys, folder, "--data", data, "--bootstrap", "300", "--batch-size", "4")
    assert again["ci95"] == result["ci95"]  # seeded
    other = run_json(capsys, folder, "--data", data, "--bootstrap", "300", "--batch-size", "4", "--seed", "1")
    assert other["ci95"] != result["ci95"]


def test_limit_progress_and_table(folder, tmp_path, capsys):
    docs = tmp_path / "docs"
    for i in range(3):
        write_corpus(docs, ENGLISH[i * 300:(i + 1) * 300], f"{i}.txt")
    one = run_json(capsys, folder, "--data", docs / "0.txt")
    limited = run_json(capsys, folder, "--data", docs, "--limit", "1")
    assert limited["tokens"] == one["tokens"] and limited["loss"] == pytest.approx(one["loss"])
    assert main(["eval", str(folder), "--data", str(docs), "--bootstrap", "50", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "ex/s" in err  # the bar's rate of examples per second
    header, *rows = out.splitlines()
    assert header.split() == ["metric", "value", "95%", "CI"]
    assert rows[0].startswith("loss") and rows[2].startswith("bits/byte") and "[" in rows[0]


def sentiment_rows(tmp_path):
    rows = [{"sentence": text, "label": label} for text, label in SENTIMENT]
    return write_jsonl(tmp_path / "sst.jsonl", rows), rows


def test_verbalizer_classification_equals_a_hand_computation(folder, tmp_path, capsys):
    data, rows = sentiment_rows(tmp_path)
    template = "Review: {sentence}\nSentiment:"
    result = run_json(capsys, folder, "--data", data, "--template", template, "--verbalizer", "0=terrible,1=great",
                      "--shots", "2", "--shots-file", data, "--bootstrap", "100")
    model, tokenizer = load_model(folder)
    shots = draw_shots(data, 2, seed=0)
    assert shots == draw_shots(data, 2, seed=0) != draw_shots(data, 2, seed=5)
    words = {0: "terrible", 1: "great"}
    prompts = build_prompts(template, rows, shots, lambda shot: words[shot["label"]])
    assert prompts[0] == "".join(f"Review: {s['sentence']}\nSentiment: {words[s['label']]}\n\n" for s in shots) + \
        f"Review: {rows[0]['sentence']}\nSentiment:"
    predicted = []
    for prompt in prompts:
        scores = [loglikelihoods(model, tokenizer, [(prompt, " " + words[label])])[0][0] for label in (0, 1)]
        predicted.append(int(scores[1] > scores[0]))
    labels = [label for _, label in SENTIMENT]
    assert result["accuracy"] == accuracy(predicted, labels)
    assert result["macro_f1"] == pytest.approx(macro_f1(predicted, labels, labels=[0, 1]))
    assert result["shots"] == 2 and result["examples"] == len(rows) and result["task"] == "classify (prompted)"
    low, high = result["ci95"]["accuracy"]
    assert low <= result["accuracy"] <= high


def test_generation_task_scored_by_squad_metrics(folder, tmp_path, capsys):
    rows = [{"question": "what is quick?", "answer": "the fox"}, {"question": "who sleeps?", "answer": "the dog"}]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = run_json(capsys, folder, "--task", "qa", "--data", data, "--template", "Question: {question}\nAnswer:",
                      "--max-new-tokens", "6")
    model, tokenizer = load_model(folder)
    prompts = [f"Question: {row['question']}\nAnswer:" for row in rows]
    outputs = [t.strip() for t in generate(model, tokenizer, prompts, GenerationConfig(6, temperature=0.0,
                                                                                         stop=("\n",)))]
    expected = squad_scores(outputs, [[row["answer"]] for row in rows])
    assert result["exact_match"] == expected["exact_match"] and result["f1"] == pytest.approx(expected["f1"])


def test_prompting_mistakes_are_one_line_errors(folder, tmp_path, capsys):
    data, _ = sentiment_rows(tmp_path)
    cases = [
        (["--template", "Review: {text}", "--verbalizer", "0=bad,1=good"], "the template's {text} is not a field"),
        (["--template", "{sentence}", "--verbalizer", "0=bad"], "--verbalizer needs at least two labels"),
        (["--template", "{sentence}", "--shots", "2"], "--shots K needs K >= 0 and --shots-file FILE"),
        (["--template", "{sentence}", "--verbalizer", "0=bad,2=good"], "label '1' has no word in --verbalizer"),
        (["--task", "choice", "--limit", "0"], "--limit must be at least 1; got 0"),
    ]
    for flags, message in cases:
        assert main(["eval", str(folder), "--data", str(data), *flags]) == 2
        assert message in one_line_error(capsys.readouterr().err)


def test_an_encoder_cannot_score_choices(tmp_path, capsys):
    enc = tiny_folder(tmp_path / "enc", arch="encoder")
    data = write_jsonl(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    assert main(["eval", str(enc), "--task", "choice", "--data", str(data)]) == 2
    assert "log-likelihood scoring needs a decoder; this model is a encoder" in capsys.readouterr().err


def test_tiny_model_is_deterministic():
    tokenizer = bpe_tokenizer()
    a, b = tiny_model(tokenizer), tiny_model(tokenizer)
    assert torch.equal(a.token_embedding.weight, b.token_embedding.weight)


def test_prompting_a_classifier_is_refused(tmp_path, capsys):
    from lmforge.config import ModelConfig
    from lmforge.model.classifier import build_model
    from lmforge.model_folder import save_model

    tokenizer = bpe_tokenizer()
    config = ModelConfig.from_dict({**tiny_model(tokenizer).config.to_dict(), "n_labels": 2})
    save_model(build_model(config), tmp_path / "cls", tokenizer)
    data, _ = sentiment_rows(tmp_path)
    assert main(["eval", str(tmp_path / "cls"), "--data", str(data), "--template", "{sentence}",
                 "--verbalizer", "0=bad,1=good"]) == 2
    assert "log-likelihood scoring needs a language model; this folder is fine-tuned for a task" in \
        capsys.readouterr().err
