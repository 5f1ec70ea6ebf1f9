"""Task metrics: scikit-learn's macro F1, SQuAD v1.1 by hand, sacrebleu's own command line, rouge-score
itself, multiple choice, bootstrap intervals, and the one-line errors the CLI shows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from lmforge.errors import LmforgeError
from lmforge.evaluate import (
    accuracy,
    bleu,
    bootstrap_interval,
    choice_accuracy,
    chrf,
    exact_match,
    macro_f1,
    metric_interval,
    normalize_answer,
    rouge,
    squad_scores,
    token_f1,
)

SACREBLEU = Path(sys.executable).parent / "sacrebleu"

HYPOTHESES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog!",
    "Hello world, this is a test of the system.",
    "It rained all day in Paris",
    "They said no.",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dog!",
    "Hello, world: this is a small test of our system.",
    "It was raining all day long in Paris.",
    "They said yes.",
]
SECOND_REFERENCES = [
    "A cat sat on the mat.",
    "A fast brown fox leaps over a lazy dog.",
    "Hello world, this is only a test.",
    "In Paris it rained the whole day.",
    "No, they said.",
]


# ---------------------------------------------------------------------------- classification

def test_accuracy_is_the_fraction_of_exact_matches() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0


def test_macro_f1_averages_labels_not_examples() -> None:
    """a: TP 2 of 3 predicted, 2 true -> 4/5; b: TP 1 of 1 predicted, 2 true -> 2/3. Micro F1 (= accuracy) is 3/4."""
    assert macro_f1(["a", "a", "a", "b"], ["a", "a", "b", "b"]) == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_macro_f1_counts_an_explicit_label_that_never_occurs_as_zero() -> None:
    """scikit-learn's default zero_division: the absent label "c" scores 0 and stays in the mean."""
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert macro_f1(["a", "b"], ["a", "b"], labels=["a", "b", "c"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["int", "str"])
def test_macro_f1_matches_sklearn_on_random_labels(seed: int, kind: str) -> None:
    """Including labels= lists that add an absent label and leave out a present one."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    classes = [0, 1, 2, 3] if kind == "int" else ["neg", "neu", "pos", "mixed"]
    predictions = [classes[i] for i in rng.integers(0, 3, size=n)]  # never the 4th class
    references = [classes[i] for i in rng.integers(0, 3, size=n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the absent label; its value is what we compare
        for labels in (None, classes, classes[1:]):
            expected = f1_score(references, predictions, average="macro", labels=labels)
            assert macro_f1(predictions, references, labels=labels) == pytest.approx(expected), labels


# ---------------------------------------------------------------------------- extractive QA

@pytest.mark.parametrize("raw, normalized", [
    ("Paris", "paris"),                              # lower-case
    ("don't stop!", "dont stop"),                    # ASCII punctuation deleted, not turned into spaces
    ("the-end", "theend"),                           # ... so a hyphenated article is no longer a word
    ("The Eiffel Tower", "eiffel tower"),            # articles are dropped
    ("an apple a day", "apple day"),
    ("theatre another", "theatre another"),          # but only as whole words
    ("  New \t York\n", "new york"),                 # whitespace collapsed
    ("\u201chi\u201d", "\u201chi\u201d"),            # non-ASCII quotes are not SQuAD punctuation
])
def test_normalize_answer_applies_each_squad_rule(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_after_normalisation_against_any_gold_answer() -> None:
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_token_f1_counts_repeated_tokens_as_a_multiset() -> None:
    """[cat, cat, sat] vs [cat, sat, on, mat]: 2 shared (cat only once), P = 2/3, R = 2/4, F1 = 4/7."""
    assert token_f1("the cat the cat sat", ["The cat sat on the mat"]) == pytest.approx(4 / 7)


def test_token_f1_takes_the_best_gold_answer() -> None:
    """[cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8; "dog" shares nothing."""
    assert token_f1("cat sat", ["dog", "the cat sat down"]) == pytest.approx(0.8)


def test_empty_answers_agree_only_with_empty_answers() -> None:
    """An answer that normalises to nothing ("the") matches another such answer, and nothing else."""
    assert token_f1("", [""]) == exact_match("", [""]) == 1.0
    assert token_f1("the", ["a"]) == exact_match("the", ["a"]) == 1.0
    assert token_f1("", ["Paris"]) == exact_match("", ["Paris"]) == 0.0
    assert token_f1("Paris", [""]) == exact_match("an", ["Paris"]) == 0.0


def test_squad_scores_are_means_over_questions_in_percent() -> None:
    scores = squad_scores(["The Eiffel Tower", "the cat the cat sat"],
                          [["Eiffel Tower", "the tower"], ["The cat sat on the mat"]])
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 100 * (1 + 4 / 7) / 2})


# ---------------------------------------------------------------------------- generation

def _sacrebleu_command_line(folder: Path, hypotheses: list[str], streams: list[list[str]]) -> dict[str, dict]:
    """BLEU and chrF as sacrebleu's own CLI prints them for the same text files, by metric name."""
    hyp_file = folder / "hyp.txt"
    hyp_file.write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    ref_files = []
    for number, stream in enumerate(streams):
        ref_files.append(folder / f"ref{number}.txt")
        ref_files[-1].write_text("\n".join(stream) + "\n", encoding="utf-8")
    command = [str(SACREBLEU), *map(str, ref_files), "-i", str(hyp_file), "-m", "bleu", "chrf",
               "--format", "json", "--width", "10"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {entry["name"]: entry for entry in json.loads(output)}


@pytest.mark.parametrize("references, streams", [
    (REFERENCES, [REFERENCES]),                                       # a single list
    ([REFERENCES, SECOND_REFERENCES], [REFERENCES, SECOND_REFERENCES]),  # two reference streams
])
def test_bleu_and_chrf_equal_sacrebleu_command_line(tmp_path: Path, references: list, streams: list) -> None:
    """Same corpus-level numbers and signatures as `sacrebleu REF... -i HYP -m bleu chrf` (10 decimals)."""
    expected = _sacrebleu_command_line(tmp_path, HYPOTHESES, streams)
    for ours, theirs in ((bleu(HYPOTHESES, references), expected["BLEU"]),
                         (chrf(HYPOTHESES, references), expected["chrF2"])):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-9)
        assert ours["signature"] == theirs["signature"]


def test_bleu_options_reach_sacrebleu_and_its_signature() -> None:
    lowered = bleu([h.upper() for h in HYPOTHESES], REFERENCES, lowercase=True)
    assert lowered["score"] == pytest.approx(bleu(HYPOTHESES, REFERENCES)["score"])
    assert "case:lc" in lowered["signature"]


def test_rouge_by_hand_needs_the_stemmer() -> None:
    """Stemmed: [the, cat, are, run] vs [the, cat, is, run] ("are" is too short to stem). ROUGE-1 and
    ROUGE-L share 3 of 4 tokens (75); ROUGE-2 shares "the cat" of 3 bigrams. Unstemmed, ROUGE-1 would be 50."""
    scores = rouge(["The cats are running"], ["the cat is running"])
    assert scores == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 75.0})


def test_rouge_is_rouge_score_with_stemming_averaged_over_examples() -> None:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(reference, hypothesis) for hypothesis, reference in zip(HYPOTHESES, REFERENCES, strict=True)]
    expected = {name: 100 * float(np.mean([s[name].fmeasure for s in direct])) for name in direct[0]}
    assert rouge(HYPOTHESES, REFERENCES) == pytest.approx(expected)


# ---------------------------------------------------------------------------- multiple choice

def test_choice_accuracy_takes_the_most_likely_choice_and_the_lowest_index_on_ties() -> None:
    log_likelihoods = [[-1.0, -2.0, -3.0], [-5.0, -1.0], [-2.0, -2.0, -9.0, -4.0]]  # choices per example differ
    assert choice_accuracy(log_likelihoods, [0, 1, 0]) == {"accuracy": 1.0}
    assert choice_accuracy(log_likelihoods, [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}  # the tie goes to 0


def test_choice_accuracy_norm_divides_by_the_given_lengths() -> None:
    """-6 over 6 characters beats -4 over 2: the raw score prefers the short answer, the normalised one the long."""
    assert choice_accuracy([[-6.0, -4.0]], [0], lengths=[[6, 2]]) == {"accuracy": 0.0, "accuracy_norm": 1.0}
    assert choice_accuracy([[-6.0, -4.0]], [1], lengths=[[6, 2]]) == {"accuracy": 1.0, "accuracy_norm": 0.0}


# ---------------------------------------------------------------------------- bootstrap

def _correct(n: int, p: float, seed: int) -> np.ndarray:
    """Per-example 0/1 correctness with exactly round(n * p) ones, shuffled."""
    correct = np.zeros(n)
    correct[:round(n * p)] = 1.0
    np.random.default_rng(seed).shuffle(correct)
    return correct


def _accuracy_interval(correct: np.ndarray, **options) -> tuple[float, float]:
    return bootstrap_interval(lambda indices: correct[indices].mean(), len(correct), **options)


def test_interval_contains_the_point_estimate() -> None:
    correct = _correct(200, 0.7, seed=1)
    low, high = _accuracy_interval(correct)
    assert low < correct.mean() < high


def test_interval_is_reproducible_for_a_seed_and_moves_with_it() -> None:
    correct = _correct(200, 0.7, seed=1)
    assert _accuracy_interval(correct, seed=5) == _accuracy_interval(correct, seed=5)
    assert _accuracy_interval(correct, seed=5) != _accuracy_interval(correct, seed=6)


def test_interval_narrows_as_one_over_sqrt_n() -> None:
    """Same accuracy (0.7) at 50 and 2000 examples: widths should differ by sqrt(40) ~ 6.3. At n = 50 the
    bootstrap variance is (n-1)/n of the true one and the values sit on a 1/50 grid, so the ratio runs a few
    percent low; 20% covers that and the Monte Carlo error of 1000 resamples (~3%)."""
    widths = [high - low for low, high in (_accuracy_interval(_correct(n, 0.7, seed=2)) for n in (50, 2000))]
    assert widths[0] / widths[1] == pytest.approx(math.sqrt(2000 / 50), rel=0.2)


def test_constant_metric_has_a_zero_width_interval() -> None:
    assert _accuracy_interval(np.ones(30)) == (1.0, 1.0)


def test_mean_accuracy_interval_is_close_to_the_normal_approximation() -> None:
    """n = 1000 draws of Bernoulli(0.7): p ± 1.96 sqrt(p(1-p)/n) is ±0.028. Each end may be off by 0.0025: the 2.5%
    quantile of 5000 resamples has a Monte Carlo sd of ~0.0005 and the grid is 0.001 (over 20 seeds the worst end was
    0.0014 off), while a 90% interval would be 0.0045 narrower at each end."""
    correct = (np.random.default_rng(0).random(1000) < 0.7).astype(float)
    p, n = correct.mean(), len(correct)
    half_width = 1.96 * math.sqrt(p * (1 - p) / n)
    low, high = _accuracy_interval(correct, resamples=5000)
    assert low == pytest.approx(p - half_width, abs=0.0025)
    assert high == pytest.approx(p + half_width, abs=0.0025)


def test_metric_interval_resamples_the_same_examples_in_every_column() -> None:
    """Equal to bootstrapping the per-example correctness: columns resampled independently would not be."""
    rng = np.random.default_rng(3)
    references = rng.integers(0, 3, size=100)
    predictions = np.where(rng.random(100) < 0.7, references, (references + 1) % 3).tolist()  # a list column
    record = metric_interval(accuracy, predictions, references, seed=4)   # and an array column
    correct = (np.asarray(predictions) == references).astype(float)
    low, high = _accuracy_interval(correct, seed=4)
    assert record == pytest.approx({"value": correct.mean(), "low": low, "high": high})


def test_metric_interval_serves_corpus_bleu_with_several_streams() -> None:
    record = metric_interval(lambda hyps, *streams: bleu(hyps, list(streams)), HYPOTHESES, REFERENCES,
                             SECOND_REFERENCES, key="score", resamples=50)
    assert record["value"] == bleu(HYPOTHESES, [REFERENCES, SECOND_REFERENCES])["score"]
    assert record["low"] <= record["value"] <= record["high"]
    assert record["low"] < record["high"]


# ---------------------------------------------------------------------------- errors the CLI shows

@pytest.mark.parametrize("call, message", [
    (lambda: accuracy([1, 2], [1]), "accuracy: predictions and references differ in length (2 vs 1)"),
    (lambda: accuracy([], []), "accuracy: no predictions to score"),
    (lambda: macro_f1([1], [1, 2]), "macro_f1: predictions and references differ in length (1 vs 2)"),
    (lambda: macro_f1([1], [1], labels=[]),
     "macro_f1: labels is empty (give at least one label, or None for all seen labels)"),
    (lambda: squad_scores(["a"], []), "squad_scores: predictions and gold answer lists differ in length (1 vs 0)"),
    (lambda: squad_scores([], []), "squad_scores: no predictions to score"),
    (lambda: exact_match("a", []), 'exact_match: no gold answers (for a question without an answer pass [""])'),
    (lambda: token_f1("a", "a"), "token_f1: gold answers must be a list of strings, not one string"),
    (lambda: bleu(["a"], ["a", "b"]), "bleu: hypotheses and references differ in length (1 vs 2)"),
    (lambda: bleu(["a", "b"], [["a", "b"], ["a"]]),
     "bleu: hypotheses and reference stream 2 differ in length (2 vs 1)"),
    (lambda: bleu([], []), "bleu: no hypotheses to score"),
    (lambda: chrf(["a"], []), "chrf: no references given"),
    (lambda: chrf(["a"], ["a", ["a"]]),
     "chrf: references must be a list of strings or a list of reference streams (lists of strings, one per "
     "hypothesis)"),
    (lambda: rouge(["a"], ["a", "b"]), "rouge: predictions and references differ in length (1 vs 2)"),
    (lambda: choice_accuracy([[0.0]], [0, 0]), "choice_accuracy: log-likelihoods and labels differ in length (1 vs 2)"),
    (lambda: choice_accuracy([], []), "choice_accuracy: no log-likelihoods to score"),
    (lambda: choice_accuracy([[0.0, 1.0]], [2]), "choice_accuracy: example 0 has label 2 but 2 choice(s)"),
    (lambda: choice_accuracy([[0.0, math.nan]], [0]), "choice_accuracy: example 0 has a NaN log-likelihood"),
    (lambda: choice_accuracy([[0.0, 1.0]], [0], lengths=[[3, 0]]),
     "choice_accuracy: example 0 needs one positive length per choice (2), got [3, 0]"),
    (lambda: bootstrap_interval(lambda indices: 0.0, 0), "bootstrap: no examples to resample"),
    (lambda: metric_interval(accuracy, [1, 2], [1]), "bootstrap: columns differ in length (2, 1)"),
])
def test_bad_input_raises_one_clear_line(call, message: str) -> None:
    with pytest.raises(LmforgeError) as raised:
        call()
    assert str(raised.value) == message
