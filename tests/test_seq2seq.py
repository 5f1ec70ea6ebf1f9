"""Translation and summarisation: parallel data, training through the Trainer, decoding, scoring.

A tiny encoder-decoder learns to copy sentences of ten words in a few seconds; the rest checks
the data rules (alignment, skips, filtering, bucketing), exact resume, output order, the greedy
loop against generate.py, BLEU against sacrebleu's own command line, and one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, one_line_error, one_thread, snapshot, token_cache  # noqa: F401
from test_interop import bart  # noqa: F401  (a tiny converted BartForConditionalGeneration folder)

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.evaluate.seq2seq import load_seq2seq
from lmforge.finetune.batches import ExampleSampler
from lmforge.model import LanguageModel
from lmforge.model_folder import load_model, save_model
from lmforge.seq2seq.data import Sides, build_examples, collate, padding_fraction, read_pairs, write_jsonl_pairs
from lmforge.seq2seq.decode import DecodeOptions, decode_texts, greedy
from lmforge.seq2seq.train import prepare_seq2seq_run
from lmforge.tokenize import Tokenizer

WORDS = "red blue green cat dog sun moon tree fish bird".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TINY = ["--vocab-size", "300", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--block-size", "32",
        "--batch-size", "32", "--lr", "3e-3", "--warmup-steps", "20", "--dropout", "0", "--no-progress", "--no-bf16"]


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("copy")
    write_lines(root / "train.txt", sentences(1100, 0))
    write_lines(root / "val.txt", sentences(60, 1))
    return root


@pytest.fixture(scope="module")
def copier(copy_data, tmp_path_factory) -> Path:
    """A Transformer that learned to copy (trained once, read-only for the tests)."""
    out = tmp_path_factory.mktemp("copier") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE_DIR", str(out.parent / "cache"))
        torch.set_num_threads(1)
        code = main(["pretrain", "--task", "translate", "--source-file", str(copy_data / "train.txt"),
                     "--target-file", str(copy_data / "train.txt"), "--val-source-file", str(copy_data / "val.txt"),
                     "--val-target-file", str(copy_data / "val.txt"), *TINY, "--max-steps", "300",
                     "--eval-every", "150", "--save-every", "150", "--label-smoothing", "0", "--out", str(out)])
    assert code == 0
    return out


# ---------------------------------------------------------------------------- data

def test_misaligned_files_are_one_error(tmp_path):
    src = write_lines(tmp_path / "a.en", ["one", "two", "three"])
    tgt = write_lines(tmp_path / "a.de", ["eins", "zwei"])
    with pytest.raises(LmforgeError, match=r"a.en has 3 lines but .*a.de has 2: aligned files need one line per pair"):
        read_pairs(src, tgt)


def test_empty_sides_are_skipped_and_counted(tmp_path):
    src = write_lines(tmp_path / "a.en", ["one", "", "three", "four", " "])
    tgt = write_lines(tmp_path / "a.de", ["eins", "zwei", "", "vier", "fuenf"])
    pairs, skipped = read_pairs(src, tgt)
    assert [(p.line, p.source, p.target) for p in pairs] == [(1, "one", "eins"), (4, "four", "vier")]
    assert skipped.count == 3
    assert "2 with an empty source (lines 2, 5)" in skipped.summary()
    assert "1 with an empty target (line 3)" in skipped.summary()


def test_jsonl_pairs_columns_and_lists(tmp_path):
    path = tmp_path / "sum.jsonl"
    path.write_text(json.dumps({"source": ["First sentence.", "Second one."], "target": ["tldr a", "tldr b"]}) + "\n"
                    + json.dumps({"dialogue": "x", "summary": "y"}) + "\n", encoding="utf-8")
    pairs, skipped = read_pairs(data=path)
    assert (pairs[0].source, pairs[0].target) == ("First sentence. Second one.", "tldr a")  # sources join, first target
    assert skipped.count == 1  # the second row has no source/target fields
    other = tmp_path / "dialogues.jsonl"
    other.write_text(json.dumps({"dialogue": "x", "summary": "y", "topic": "z"}) + "\n", encoding="utf-8")
    pairs, _ = read_pairs(data=other)  # dialogue and summary are known names
    assert [(p.source, p.target) for p in pairs] == [("x", "y")]
    pairs, _ = read_pairs(data=other, source_column="topic")
    assert [(p.source, p.target) for p in pairs] == [("z", "y")]
    with pytest.raises(LmforgeError, match="has no column 'body' for the source"):
        read_pairs(data=path, source_column="body")


def test_length_and_ratio_filtering_counts_what_it_drops():
    tokenizer = Tokenizer.train("char", ["abcdefghij "])
    sides = Sides(tokenizer)
    from lmforge.seq2seq.data import TextPair

    pairs = [TextPair(1, "abc", "abc"), TextPair(2, "abcdefghij", "ab"), TextPair(3, "a", "abcdefghij"),
             TextPair(4, "abcdef", "abcdefgh")]
    examples, dropped = build_examples(pairs, sides, max_source_len=8, max_target_len=8, max_ratio=2.0)
    assert [e.index for e in examples] == [0]
    assert dropped.reasons == {"with a source over 8 tokens": 1, "with a target over 8 tokens": 2}
    examples, dropped = build_examples(pairs, sides, max_source_len=20, max_target_len=20, max_ratio=2.0)
    assert [e.index for e in examples] == [0, 3] and dropped.reasons == {"with a length ratio over 2": 2}
    assert dropped.summary() == "dropped 2 of 4 pairs: 2 with a length ratio over 2"
    examples, _ = build_examples(pairs, sides, max_source_len=5, max_target_len=20, truncate_source=True)
    assert len(examples[1].input_ids) == 5 and examples[1].input_ids[-1] == tokenizer.eos_id  # kept, cut, eos last


def test_collate_shifts_the_target_right():
    tokenizer = Tokenizer.train("char", ["abc"])
    sides = Sides(tokenizer)
    from lmforge.seq2seq.data import TextPair

    examples, _ = build_examples([TextPair(1, "ab", "abc"), TextPair(2, "a", "c")], sides, 10, 10)
    batch = collate(examples, sides.pad_id, start_id=99)
    eos, a, b, c = tokenizer.eos_id, *tokenizer.encode("abc")
    assert batch["input_ids"].tolist() == [[a, b, eos], [a, eos, sides.pad_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[a, b, c, eos], [c, eos, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[99, a, b, c], [99, c, sides.pad_id, sides.pad_id]]


def test_a_tokenizer_with_bos_frames_both_sides_as_bart_does():
    tokenizer = Tokenizer.train("char", ["abc"], special_tokens=["<s>", "<pad>", "</s>"])
    sides = Sides(tokenizer)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    a, b, c = tokenizer.encode("abc")
    assert sides.encode_sources(["abc"], 4) == [[bos, a, b, eos]]  # cut to 4 tokens, bos and eos kept
    assert sides.encode_targets(["ab"]) == [[bos, a, b, eos]]
    assert sides.decode([bos, a, c]) == "ac"


def test_bucketing_pads_less_than_random_batches():
    rng = random.Random(0)
    tokenizer = Tokenizer.train("char", ["ab"])
    from lmforge.seq2seq.data import Example

    examples = [Example([1] * n, [1] * n, i) for i, n in enumerate(rng.randint(1, 60) for _ in range(2000))]
    sampler = ExampleSampler(examples, 16, 0, collate=lambda batch: batch)
    bucketed = padding_fraction(sampler._batches, examples)
    shuffled = list(range(len(examples)))
    rng.shuffle(shuffled)
    unsorted = padding_fraction([shuffled[k:k + 16] for k in range(0, 2000, 16)], examples)
    assert bucketed < 0.05 < 0.3 < unsorted
    assert tokenizer.vocab_size  # (the tokenizer only makes the example ids plausible)


def test_separate_vocabularies_do_not_share_rows():
    sides = Sides.train([read_pair("the cat", "die Katze"), read_pair("a dog", "ein Hund")] * 20, 300, separate=True)
    assert sides.offset == sides.target.vocab_size and sides.vocab_size == sides.offset + sides.source.vocab_size
    source = sides.encode_sources(["the cat"], 32)[0]
    assert min(source) >= sides.offset and source[-1] == sides.source.eos_id + sides.offset
    assert sides.decode(sides.target.encode("die Katze") + [sides.offset + 5]) == "die Katze"  # a source id is dropped
    again = Sides.from_task(sides.task_fields(), sides.target)
    assert again.encode_sources(["the cat"], 32) == [source]


def read_pair(source: str, target: str):
    from lmforge.seq2seq.data import TextPair

    return TextPair(0, source, target)


# ---------------------------------------------------------------------------- decoding

def tiny_seq2seq(tmp_path, vocab_texts=("hello world", "hallo welt")) -> Path:
    tokenizer = Tokenizer.train("bpe", list(vocab_texts) * 5, vocab_size=300)
    config = ModelConfig(arch="encoder-decoder", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                         block_size=32, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                         decoder_start_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "tiny", tokenizer)
    return tmp_path / "tiny"


def test_greedy_matches_generate_on_an_encoder_decoder(tmp_path):
    from lmforge.generate import GenerationConfig, decode_steps

    model, tokenizer = load_model(tiny_seq2seq(tmp_path))
    sources = [tokenizer.encode("hello world") + [tokenizer.eos_id], tokenizer.encode("hallo") + [tokenizer.eos_id]]
    mine = greedy(model, sources, [12, 12], tokenizer.eos_id, tokenizer.pad_id)
    steps = [tokens for tokens, _ in decode_steps(model, sources, GenerationConfig(max_new_tokens=12, temperature=0),
                                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)]
    for row, (ids, score) in enumerate(mine):
        theirs = [step[row] for step in steps]
        theirs = theirs[: theirs.index(tokenizer.eos_id)] if tokenizer.eos_id in theirs else theirs
        assert ids == theirs
        # the score is the sum of the chosen tokens' log-probabilities under a full teacher-forced pass
        start = model.config.decoder_start_token_id
        full = ids + ([tokenizer.eos_id] if len(ids) < 12 else [])
        with torch.no_grad():
            logits = model(torch.tensor([sources[row]]), decoder_input_ids=torch.tensor([[start, *full[:-1]]])).logits
            expected = logits[0].log_softmax(-1).gather(1, torch.tensor(full)[:, None]).sum()
        assert score == pytest.approx(float(expected), abs=1e-4)


def test_copier_learned_and_outputs_keep_input_order(copier, copy_data, capsys):
    val = (copy_data / "val.txt").read_text().splitlines()
    metrics = [json.loads(line) for line in (copier / "metrics.jsonl").read_text().splitlines()]
    assert max(m["bleu"] for m in metrics if m.get("split") == "val") > 60
    inputs = write_lines(copier.parent / "inputs.txt", val[:40])
    code, out, _ = run_cli(capsys, "translate", copier, "--input", inputs, "--batch-size", "3")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 40
    assert sum(line == source for line, source in zip(lines, val, strict=False)) >= 20  # it copies
    model, sides, task = load_seq2seq(copier)
    one_by_one = [next(decode_texts(model, sides, [text], DecodeOptions(), task))[0][0] for text in val[:40]]
    assert lines == one_by_one  # sorting by length inside a window never reorders the output


def test_beam_gives_n_best_in_order(copier, capsys):
    code, out, err = run_cli(capsys, "translate", copier, "--text", "red cat sun", "--text", "moon dog",
                             "--beam", "4", "--n-best", "3", "--json")
    assert code == 0, err
    for line in out.splitlines():
        scores = [o["score"] for o in json.loads(line)["outputs"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    code, out, _ = run_cli(capsys, "translate", copier, "--text", "red cat sun", "--beam", "4")
    assert code == 0 and len(out.splitlines()) == 1


def test_eval_equals_the_sacrebleu_command_line(copier, copy_data, capsys, tmp_path):
    src = copy_data / "val.txt"
    ref = write_lines(tmp_path / "ref.txt", [line.replace("cat", "kitten") for line in src.read_text().splitlines()])
    code, out, err = run_cli(capsys, "eval", copier, "--task", "translate", "--src", src, "--ref", ref, "--json")
    assert code == 0, err
    result = json.loads(out)
    code, hyp, _ = run_cli(capsys, "translate", copier, "--input", src)
    (tmp_path / "hyp.txt").write_text(hyp, encoding="utf-8")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(tmp_path / "hyp.txt"),
                          "-m", "bleu", "chrf", "-w", "6"], capture_output=True, text=True, check=True)
    bleu_cli, chrf_cli = json.loads(cli.stdout)
    assert round(result["bleu"], 6) == pytest.approx(bleu_cli["score"], abs=1e-9)
    assert round(result["chrf"], 6) == pytest.approx(chrf_cli["score"], abs=1e-9)
    assert result["bleu_signature"] == bleu_cli["signature"] and result["chrf_signature"] == chrf_cli["signature"]
    assert 0 < result["bleu"] < 100


def test_summarize_eval_is_rouge(copier, copy_data, capsys):
    src = copy_data / "val.txt"
    code, out, err = run_cli(capsys, "eval", copier, "--task", "summarize", "--src", src, "--ref", src, "--json")
    assert code == 0, err
    assert {"rouge1", "rouge2", "rougeL"} <= set(json.loads(out))


# ---------------------------------------------------------------------------- training

def small_run(tmp_path, out: str, **overrides) -> dict:
    write_lines(tmp_path / "train.txt", sentences(200, 3))
    options = dict(task="translate", source_file=str(tmp_path / "train.txt"), target_file=str(tmp_path / "train.txt"),
                   vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, lr=3e-3,
                   warmup_steps=2, max_steps=12, eval_every=6, save_every=6, val_decode=8, seed=3, progress=False,
                   bf16=False, out=str(tmp_path / out))
    options.update(overrides)
    return options


@pytest.mark.parametrize("arch", ["encoder-decoder", "lstm"])
def test_resume_is_exact(tmp_path, arch):
    whole = prepare_seq2seq_run(small_run(tmp_path, "whole", arch=arch, dropout=0.1))
    whole.trainer.fit()
    halves = prepare_seq2seq_run(small_run(tmp_path, "halves", arch=arch, dropout=0.1))
    halves.trainer.fit(until=6)
    resumed = prepare_seq2seq_run(small_run(tmp_path, "halves", arch=arch, dropout=0.1, resume=True))
    assert resumed.resumed and resumed.trainer.step == 6
    resumed.trainer.fit()
    assert_same_weights(snapshot(whole.model), snapshot(resumed.model))


def test_label_smoothing_is_in_the_training_loss(tmp_path):
    run = prepare_seq2seq_run(small_run(tmp_path, "ls", label_smoothing=0.2, dropout=0.0))
    trainer = run.trainer
    batch = trainer.sampler.next_batch()
    with torch.no_grad():
        smoothed = trainer._run(dict(batch)).loss
        plain = run.model(**batch).loss
        logits = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                                 label_smoothing=0.2)
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-5)
    assert float(smoothed) != pytest.approx(float(plain))


def test_finetune_from_a_folder_keeps_the_best_and_a_separate_vocab_runs(tmp_path, capsys):
    scratch = prepare_seq2seq_run(small_run(tmp_path, "scratch", separate_vocab=True))
    summary = scratch.trainer.fit()
    assert summary["best"]["metric"] == "bleu" and (tmp_path / "scratch" / "best").is_dir()
    assert json.loads((tmp_path / "scratch" / "task.json").read_text())["source_tokenizer"]
    code, out, err = run_cli(capsys, "finetune", "--task", "translate", "--model", tmp_path / "scratch",
                             "--source-file", tmp_path / "train.txt", "--target-file", tmp_path / "train.txt",
                             "--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--val-decode", "4",
                             "--no-progress", "--out", tmp_path / "tuned")
    assert code == 0, err
    assert "starting from" in out and "best val bleu" in out
    code, out, _ = run_cli(capsys, "translate", tmp_path / "tuned", "--text", "red cat")
    assert code == 0 and len(out.splitlines()) == 1


# ---------------------------------------------------------------------------- errors

def test_bad_inputs_are_one_line_errors(tmp_path, capsys, copier):
    decoder = tmp_path / "dec"
    tokenizer = Tokenizer.train("char", ["abc"])
    save_model(LanguageModel(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2,
                                         block_size=16)), decoder, tokenizer)
    src = write_lines(tmp_path / "s.txt", ["a", "b"])
    tgt = write_lines(tmp_path / "t.txt", ["a"])
    cases = [
        (("translate", copier), "give exactly one of --input FILE or --text TEXT"),
        (("translate", copier, "--text", "x", "--input", src), "give exactly one of"),
        (("translate", tmp_path / "nowhere", "--text", "x"), "model folder not found"),
        (("translate", decoder, "--text", "x"), "is a decoder model"),
        (("translate", copier, "--text", "x", "--n-best", "2"), "--n-best 2 needs --beam of at least 2"),
        (("translate", copier, "--text", "  "), "input 1 is empty"),
        (("summarize", copier, "--input", tmp_path / "missing.txt"), "file not found"),
        (("eval", copier, "--task", "translate", "--src", src), "needs --src FILE and --ref FILE"),
        (("eval", copier, "--task", "translate", "--src", src, "--ref", tgt), "has 2 lines but"),
        (("pretrain", "--source-file", src, "--target-file", tgt, "--out", tmp_path / "r"), "aligned files"),
        (("pretrain", "--source-file", src, "--out", tmp_path / "r"), "--source-file and --target-file go together"),
        (("finetune", "--task", "translate", "--model", decoder, "--source-file", src, "--target-file", src,
          "--out", tmp_path / "r2"), "is a decoder model"),
        (("finetune", "--task", "summarize", "--model", copier, "--out", tmp_path / "r3"), "no parallel data"),
        (("pretrain", "--arch", "lstm", "--n-embd", "33", "--n-head", "1", "--position", "none",
          "--source-file", src, "--target-file", src,
          "--out", tmp_path / "r4"), "needs an even n_embd"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in one_line_error(err), (argv, err)
    with pytest.raises(LmforgeError, match=r"the model and tokenizer come from .*; drop n_layer, vocab_size"):
        prepare_seq2seq_run({"task": "summarize", "init": str(copier), "n_layer": 3, "vocab_size": 100,
                             "source_file": str(src), "target_file": str(src), "out": str(tmp_path / "r5")})


def test_a_run_folder_survives_being_copied(copier, tmp_path, capsys):
    """Everything translate needs is in the folder (the source tokenizer rides in task.json)."""
    moved = tmp_path / "moved"
    shutil.copytree(copier, moved, ignore=shutil.ignore_patterns("checkpoints"))
    code, out, _ = run_cli(capsys, "translate", moved, "--text", "red cat sun moon", "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["text"] == "red cat sun moon"
    task = json.loads((moved / "task.json").read_text())
    (moved / "task.json").write_text(json.dumps({**task, "max_target_len": 2}))  # outputs stop where training did
    code, out, _ = run_cli(capsys, "translate", moved, "--text", "red cat sun moon")
    model, sides, _ = load_seq2seq(moved)
    assert code == 0 and len(sides.target.encode(out.strip())) == 1  # the limit counts the end token, as in training
    write_jsonl_pairs(tmp_path / "p.jsonl", [("a", "b")])
    assert json.loads((tmp_path / "p.jsonl").read_text()) == {"source": "a", "target": "b"}


# ---------------------------------------------------------------------------- T5 span corruption

def test_span_corruption_source_and_target_rebuild_the_window():
    from lmforge.data.collate import span_corruption

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (6, 40))
    source, target = span_corruption(ids, 3, 0.15, generator)
    for row in range(6):
        src = [t for t in source[row].tolist() if t != -1]
        tgt = [t for t in target[row].tolist() if t != -1]
        spans, current = [], None
        for token in tgt:  # the target is <s> span <s> span ...
            if token == 3:
                current = []
                spans.append(current)
            else:
                current.append(token)
        assert src.count(3) == len(spans) and sum(map(len, spans)) == 6  # round(0.15 * 40) tokens removed
        rebuilt = [t for token in src for t in (spans.pop(0) if token == 3 else [token])]
        assert rebuilt == ids[row].tolist()


def test_span_objective_pretrains_an_encoder_decoder(tmp_path, capsys):
    from helpers import ENGLISH, read_metrics, write_corpus

    corpus = write_corpus(tmp_path)
    code, out, err = run_cli(capsys, "pretrain", "--arch", "encoder-decoder", "--objective", "span", "--data", corpus,
                             "--tokenizer", "char", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                             "--block-size", "32", "--batch-size", "8", "--max-steps", "30", "--eval-every", "30",
                             "--no-progress", "--no-bf16", "--out", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["objective"] == "span"
    train = read_metrics(tmp_path / "run", "train")
    assert train[-1]["loss"] < train[0]["loss"] and ENGLISH


def test_a_converted_bart_folder_fine_tunes_for_summaries(bart, tmp_path, capsys):  # noqa: F811
    from test_interop import TEXTS

    _, folder = bart
    write_jsonl_pairs(tmp_path / "pairs.jsonl", [(text[:200], text[:30]) for text in TEXTS] * 4)
    code, out, err = run_cli(capsys, "finetune", "--task", "summarize", "--model", folder, "--data",
                             tmp_path / "pairs.jsonl", "--max-steps", "3", "--eval-every", "3", "--batch-size", "4",
                             "--val-decode", "2", "--no-progress", "--no-bf16", "--out", tmp_path / "tuned")
    assert code == 0, err
    assert json.loads((tmp_path / "tuned" / "task.json").read_text())["task"] == "summarize"
    code, out, err = run_cli(capsys, "summarize", tmp_path / "tuned", "--text", TEXTS[0][:200], "--beam", "2")
    assert code == 0 and len(out.splitlines()) == 1, err
