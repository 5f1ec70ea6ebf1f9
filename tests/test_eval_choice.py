"""Multiple choice by log-likelihood (evaluate/choice.py, eval --task choice) against a hand computation."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import CHOICES, bpe_tokenizer, tiny_model, write_jsonl
from helpers import one_line_error, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.evaluate.choice import character_lengths, choice_scores, encode_pair, loglikelihoods, read_choices
from lmforge.model_folder import save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = bpe_tokenizer()
    model = tiny_model(tokenizer)
    folder = tmp_path_factory.mktemp("choice") / "model"
    save_model(model, folder, tokenizer)
    return model, tokenizer, folder


def by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward over the whole text; the continuation's tokens are those after the
    tokens of the context without its trailing spaces."""
    text = context + continuation
    split = len(tokenizer.encode(context.rstrip(" ")))
    ids = tokenizer.encode(text)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(split, len(ids))))


@pytest.mark.parametrize("batch_size", [1, 3, 16])  # 16: contexts of different lengths share a batch
def test_scores_equal_a_hand_computation(setup, tmp_path, batch_size):
    model, tokenizer, _ = setup
    examples = read_choices(write_jsonl(tmp_path / "mc.jsonl", CHOICES))
    scores = choice_scores(model, tokenizer, examples, batch_size=batch_size)  # padding must not leak
    for example, row in zip(examples, scores, strict=True):
        expected = [by_hand(model, tokenizer, example.context, " " + choice) for choice in example.choices]
        assert row == pytest.approx(expected, abs=1e-4)
    assert character_lengths(examples)[1] == [11.0, 8.0]


def test_a_pair_longer_than_the_window_keeps_its_end(setup):
    model, tokenizer, _ = setup
    context = "The quick brown fox jumps over the lazy dog. " * 12
    ids = tokenizer.encode(context + " sleeps")
    split = len(tokenizer.encode(context.rstrip(" ")))
    assert len(ids) > model.config.block_size + 1
    kept = ids[-(model.config.block_size + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]])).logits[0].double(), dim=-1)
    n = len(ids) - split
    expected = float(sum(logprobs[t, kept[t + 1]] for t in range(len(kept) - 1 - n, len(kept) - 1)))
    (score, _), (short, _) = loglikelihoods(model, tokenizer, [(context, " sleeps"), ("The dog", " sleeps")])
    assert score == pytest.approx(expected, abs=1e-4)
    assert short == pytest.approx(by_hand(model, tokenizer, "The dog", " sleeps"), abs=1e-4)


def test_trailing_space_moves_to_the_continuation(setup):
    _, tokenizer, _ = setup
    context, continuation = encode_pair(tokenizer, "The dog sleeps in the ", "sun")
    assert context == tokenizer.encode("The dog sleeps in the")
    assert context + continuation == tokenizer.encode("The dog sleeps in the sun")


def test_greedy_flag_and_empty_context(setup):
    model, tokenizer, _ = setup
    ids = tokenizer.encode("The quick")
    with torch.no_grad():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    (score, greedy), (_, other) = loglikelihoods(model, tokenizer, [("The quick", tokenizer.decode([best])),
                                                                    ("", "The")])
    assert greedy is True
    eos = tokenizer.eos_id
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([[eos]])).logits[0, -1].double(), -1)
    (from_eos, _), = loglikelihoods(model, tokenizer, [("", tokenizer.decode([tokenizer.encode("The")[0]]))])
    assert from_eos == pytest.approx(float(first[tokenizer.encode("The")[0]]), abs=1e-5)


def test_cli_accuracy_and_normalised_accuracy(setup, tmp_path, capsys):
    model, tokenizer, folder = setup
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    assert main(["eval", str(folder), "--task", "choice", "--data", str(data), "--json", "--bootstrap", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    raw = norm = 0
    for row in CHOICES:
        lls = [by_hand(model, tokenizer, row["context"], " " + c) for c in row["choices"]]
        raw += max(range(len(lls)), key=lls.__getitem__) == row["label"]
        per_char = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        norm += max(range(len(lls)), key=per_char.__getitem__) == row["label"]
    assert result["accuracy"] == raw / len(CHOICES) and result["accuracy_norm"] == norm / len(CHOICES)
    assert result["examples"] == 4 and result["bootstrap"] == {"resamples": 200, "seed": 0}
    for metric in ("accuracy", "accuracy_norm"):
        low, high = result["ci95"][metric]
        assert 0.0 <= low <= result[metric] <= high <= 1.0

    assert main(["eval", str(folder), "--task", "choice", "--data", str(data), "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 2


def test_bad_rows_are_one_line_errors(setup, tmp_path, capsys):
    _, _, folder = setup
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a", "b"], "label": 2}])
    assert main(["eval", str(folder), "--task", "choice", "--data", str(bad)]) == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        "bad.jsonl, line 1: label must be an index into its 2 choices, got 2")
