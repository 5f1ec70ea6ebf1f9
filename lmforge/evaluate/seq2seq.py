"""Scoring translators and summarisers: decode the sources, score against the references.

BLEU and chrF are sacrebleu's own (the default 13a tokenisation on detokenised text, the
signature printed beside the score), so a figure here is the figure `sacrebleu REF < HYP`
prints for the same output. ROUGE is rouge-score's, with the Porter stemmer (metrics.rouge).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.evaluate.metrics import bleu, chrf, rouge

SEQ2SEQ_ARCHS = ("encoder-decoder", "lstm")


def read_lines(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise LmforgeError(f"{path} is empty")
    return lines


def load_seq2seq(folder):
    """(model, Sides, task) of a model folder that maps texts to texts: a translation or summary
    run's, an LSTM's, or any encoder-decoder (a converted BART folder too)."""
    from lmforge.model_folder import load_model, read_task
    from lmforge.seq2seq.data import Sides

    model, tokenizer = load_model(folder)
    if model.config.arch not in SEQ2SEQ_ARCHS:
        raise LmforgeError(f"{folder} is a {model.config.arch} model; translate, summarize and eval --task "
                           "need an encoder-decoder")
    task = read_task(folder)
    return model, Sides.from_task(task, tokenizer), task


def score_outputs(task: str, hypotheses: list[str], references: list[str]) -> dict:
    """BLEU, chrF and their signatures (translate), or ROUGE-1/2/L (summarize)."""
    if task == "summarize":
        return rouge(hypotheses, references)
    b, c = bleu(hypotheses, references), chrf(hypotheses, references)
    return {"bleu": b["score"], "chrf": c["score"], "bleu_signature": b["signature"], "chrf_signature": c["signature"]}


def evaluate_files(model_dir, task: str, src, ref, options, hyp_out=None) -> dict:
    """Decode `src` line by line with `options` (seq2seq.decode.DecodeOptions) and score it
    against `ref`; `hyp_out` also writes the outputs, one per line."""
    from lmforge.seq2seq.decode import decode_texts

    sources, references = read_lines(src), read_lines(ref)
    if len(sources) != len(references):
        raise LmforgeError(f"{src} has {len(sources)} lines but {ref} has {len(references)}: one reference per source")
    model, sides, saved = load_seq2seq(model_dir)
    hypotheses = [found[0][0] for found in decode_texts(model, sides, sources, options, saved)]
    if hyp_out is not None:
        from lmforge.atomic import atomic_write_text

        atomic_write_text(Path(hyp_out), "".join(h + "\n" for h in hypotheses))
    return {**score_outputs(task, hypotheses, references), "sentences": len(hypotheses)}

