"""Task metrics: classification, extractive QA, generation and multiple choice, in one place.

Every task and the eval CLI score through these functions, so a number printed anywhere in
lmforge means the same thing. BLEU, chrF and ROUGE are sacrebleu and rouge-score themselves,
only wrapped (their numbers must match what papers report); the rest is written here from the
definitions. Scales follow the field: accuracy and F1 for classification are fractions (0..1, as
scikit-learn gives them); SQuAD, BLEU, chrF and ROUGE are 0..100, as their papers print them.
Bad input (mismatched lengths, nothing to score) raises LmforgeError with one line.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from lmforge.errors import LmforgeError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_paired(metric: str, first: Sequence, second: Sequence, first_name: str, second_name: str) -> None:
    """One message for the two mistakes every metric shares: nothing to score, or unpaired inputs."""
    if len(first) != len(second):
        raise LmforgeError(f"{metric}: {first_name} and {second_name} differ in length ({len(first)} vs {len(second)})")
    if len(first) == 0:
        raise LmforgeError(f"{metric}: no {first_name} to score")


# ---------------------------------------------------------------------------- classification

def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference (0..1)."""
    _check_paired("accuracy", predictions, references, "predictions", "references")
    return float(sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions))


def macro_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean over labels of each label's F1 (0..1), so rare classes count as much as
    frequent ones; scikit-learn's f1_score(average="macro") with its defaults.

    Without `labels`, the labels are those seen in predictions or references. With `labels`,
    exactly those are averaged (others still count as wrong answers for the listed ones), and a
    listed label with no predicted and no true instance scores F1 = 0, as scikit-learn's default
    zero_division does: it pulls the mean down rather than silently leaving the average.
    """
    _check_paired("macro_f1", predictions, references, "predictions", "references")
    if labels is not None and len(labels) == 0:
        raise LmforgeError("macro_f1: labels is empty (give at least one label, or None for all seen labels)")
    predicted = Counter(predictions)
    true = Counter(references)
    correct = Counter(p for p, r in zip(predictions, references, strict=True) if p == r)
    averaged = list(dict.fromkeys(labels)) if labels is not None else list(predicted.keys() | true.keys())
    f1_sum = 0.0
    for label in averaged:
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + true); 0 when the label never occurs.
        denominator = predicted[label] + true[label]
        f1_sum += 2 * correct[label] / denominator if denominator else 0.0
    return float(f1_sum / len(averaged))


# ---------------------------------------------------------------------------- extractive QA (SQuAD v1.1)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation, in its order: lower-case, delete ASCII punctuation (so "don't"
    becomes "dont" and "the-end" becomes "theend"), drop the words a/an/the, collapse whitespace.
    Non-ASCII punctuation (curly quotes, «») is kept, as in SQuAD's own definition."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_gold(metric: str, gold_answers: Sequence[str]) -> None:
    if isinstance(gold_answers, str):
        raise LmforgeError(f"{metric}: gold answers must be a list of strings, not one string")
    if len(gold_answers) == 0:
        raise LmforgeError(f'{metric}: no gold answers (for a question without an answer pass [""])')


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0. Two answers
    that normalise to nothing ("" and "the") match."""
    _check_gold("exact_match", gold_answers)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in gold_answers))


def _tokens_f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)  # both empty: they agree (1.0); one empty: 0.0
    # Multiset overlap: a repeated word is shared as many times as both sides have it.
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Best F1 (0..1) over the gold answers, between the multisets of normalised whitespace tokens.
    When both sides normalise to no tokens the F1 is 1.0 (they agree); when only one does, 0.0."""
    _check_gold("token_f1", gold_answers)
    predicted = normalize_answer(prediction).split()
    return max(_tokens_f1(predicted, normalize_answer(gold).split()) for gold in gold_answers)


def squad_scores(predictions: Sequence[str], gold_answer_lists: Sequence[Sequence[str]]) -> dict:
    """Mean exact match and F1 over questions, 0..100 as SQuAD reports them."""
    _check_paired("squad_scores", predictions, gold_answer_lists, "predictions", "gold answer lists")
    pairs = list(zip(predictions, gold_answer_lists, strict=True))
    return {"exact_match": 100.0 * sum(exact_match(p, golds) for p, golds in pairs) / len(pairs),
            "f1": 100.0 * sum(token_f1(p, golds) for p, golds in pairs) / len(pairs)}


# ---------------------------------------------------------------------------- generation

def _reference_streams(metric: str, hypotheses: Sequence[str], references: Sequence) -> list[list[str]]:
    """sacrebleu's layout: a list of streams, each holding one reference per hypothesis. A plain list
    of strings is the common single-reference case and becomes one stream."""
    if len(hypotheses) == 0:
        raise LmforgeError(f"{metric}: no hypotheses to score")
    if len(references) == 0:
        raise LmforgeError(f"{metric}: no references given")
    if all(isinstance(ref, str) for ref in references):
        _check_paired(metric, hypotheses, references, "hypotheses", "references")
        return [list(references)]
    if any(isinstance(stream, str) or not isinstance(stream, Sequence) for stream in references):
        raise LmforgeError(f"{metric}: references must be a list of strings or a list of reference streams "
                           f"(lists of strings, one per hypothesis)")
    for number, stream in enumerate(references, start=1):
        _check_paired(metric, hypotheses, stream, "hypotheses", f"reference stream {number}")
    return [list(stream) for stream in references]


def _sacrebleu_score(metric_class, name: str, hypotheses, references, options: dict) -> dict:
    streams = _reference_streams(name, hypotheses, references)
    metric = metric_class(**options)
    return {"score": metric.corpus_score(list(hypotheses), streams).score, "signature": str(metric.get_signature())}


def bleu(hypotheses: Sequence[str], references: Sequence, **options) -> dict:
    """Corpus BLEU (0..100) and its sacrebleu signature: n-gram counts pooled over the corpus, not a
    mean of sentence scores. `references` is one list (a reference per hypothesis) or a list of
    reference streams; `options` go to sacrebleu.metrics.BLEU (e.g. tokenize="zh") and show in the
    signature, which should be printed next to the score."""
    from sacrebleu.metrics import BLEU

    return _sacrebleu_score(BLEU, "bleu", hypotheses, references, options)


def chrf(hypotheses: Sequence[str], references: Sequence, **options) -> dict:
    """Corpus chrF (0..100; chrF2 by default, word_order=2 gives chrF++) and its sacrebleu
    signature; `references` and `options` as for bleu()."""
    from sacrebleu.metrics import CHRF

    return _sacrebleu_score(CHRF, "chrf", hypotheses, references, options)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0..100), each the mean over examples, from Google's
    rouge-score with the Porter stemmer on, as summarisation papers report. Its tokenizer keeps only
    a-z and 0-9, so text in other scripts scores 0: use it for English."""
    _check_paired("rouge", predictions, references, "predictions", "references")
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score takes the target first
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


# ---------------------------------------------------------------------------- multiple choice

def _best_choice(scores: Sequence[float]) -> int:
    """Index of the highest score; on a tie the lowest index wins (max keeps the first maximum)."""
    return max(range(len(scores)), key=scores.__getitem__)


def choice_accuracy(log_likelihoods: Sequence[Sequence[float]], labels: Sequence[int],
                    lengths: Sequence[Sequence[float]] | None = None) -> dict:
    """Multiple-choice accuracy (0..1): an example is right when its label is the choice with the
    highest log-likelihood (ties go to the lowest index). Examples may have different numbers of
    choices.

    With `lengths` (one per choice, same layout as log_likelihoods), also "accuracy_norm", which ranks
    choices by log-likelihood divided by length, so long answers are not penalised for having more
    tokens to pay for. The unit is whatever you pass; pass the choice's length in characters (as
    lm-evaluation-harness's acc_norm does), which keeps the score independent of the tokenizer.
    """
    _check_paired("choice_accuracy", log_likelihoods, labels, "log-likelihoods", "labels")
    if lengths is not None:
        _check_paired("choice_accuracy", log_likelihoods, lengths, "log-likelihoods", "lengths")
    right = right_norm = 0
    for example, (scores, label) in enumerate(zip(log_likelihoods, labels, strict=True)):
        if not 0 <= label < len(scores):
            raise LmforgeError(f"choice_accuracy: example {example} has label {label} but {len(scores)} choice(s)")
        if any(math.isnan(score) for score in scores):
            raise LmforgeError(f"choice_accuracy: example {example} has a NaN log-likelihood")
        right += _best_choice(scores) == label
        if lengths is not None:
            sizes = lengths[example]
            if len(sizes) != len(scores) or any(size <= 0 for size in sizes):
                raise LmforgeError(f"choice_accuracy: example {example} needs one positive length per choice "
                                   f"({len(scores)}), got {list(sizes)}")
            right_norm += _best_choice([score / size for score, size in zip(scores, sizes, strict=True)]) == label
    result = {"accuracy": float(right / len(labels))}
    if lengths is not None:
        result["accuracy_norm"] = float(right_norm / len(labels))
    return result
