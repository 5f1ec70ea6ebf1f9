"""`lmforge finetune --task classify`, `predict` and `eval` on task folders: labelled rows in,
a model folder that remembers its labels out; both families learn; bad rows are reported by line."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401  (token_cache and one_thread are autouse fixtures)
    assert_same_weights,
    one_line_error,
    one_thread,
    read_metrics,
    script_validation,
    snapshot,
    token_cache,
)

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.evaluate.metrics import accuracy
from lmforge.finetune import classify
from lmforge.finetune.batches import ExampleSampler
from lmforge.finetune.run import prepare_task_run
from lmforge.finetune.tabular import read_rows
from lmforge.model import LanguageModel, build_model
from lmforge.model_folder import load_model, read_task, save_model
from lmforge.tokenize import Tokenizer

GOOD, BAD = ["great", "lovely", "superb"], ["awful", "dull", "poor"]
FILLER = ["the", "film", "was", "quite", "a", "plot", "cast", "story"]


def keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts whose label is decided by one sentiment word among fillers: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(GOOD if positive else BAD), *rng.sample(FILLER, 3)]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if positive else "neg"))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{label}\n" for t, label in rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def base_folder(tmp_path, request) -> Path:
    """A randomly initialised model folder with a char tokenizer: what a task run starts from."""
    arch = getattr(request, "param", "encoder")
    texts = [t for t, _ in keyword_rows(200, seed=9)]
    tokenizer = Tokenizer.train("char", texts)
    config = ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48,
                         pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id, mask_token_id=tokenizer.mask_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "base", tokenizer)
    return tmp_path / "base"


def task_options(tmp_path: Path, base: Path, out: str = "ft", **overrides) -> dict:
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(300, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t, "label": y} for t, y in keyword_rows(60, seed=2)])
    options = dict(task="classify", init=str(base), data=[str(train)], val_data=[str(val)], out=str(tmp_path / out),
                   batch_size=16, lr=3e-3, warmup_steps=5, max_steps=80, eval_every=40, save_every=40, log_every=10,
                   seed=3, progress=False, bf16=False)
    return {**options, **overrides}


@pytest.mark.parametrize("base_folder", ["encoder", "decoder"], indirect=True)
def test_both_families_learn_a_keyword_task_and_the_folder_remembers_it(tmp_path, base_folder):
    run = prepare_task_run(task_options(tmp_path, base_folder))
    before = run.trainer.evaluate()
    summary = run.trainer.fit()
    assert before["accuracy"] < 0.75 and summary["val"]["accuracy"] >= 0.95, (before, summary["val"])
    out = tmp_path / "ft"
    task = read_task(out)
    assert task["task"] == "classify" and task["labels"] == ["neg", "pos"] and task["template"] == "lmforge"
    model, _ = load_model(out)
    assert model.config.n_labels == 2 and model.config.pooling_mode == ("cls" if model.config.arch == "encoder"
                                                                           else "last")
    assert [r["step"] for r in read_metrics(out, "val")] == [40, 80]


def test_the_start_folder_weights_are_kept_and_only_the_head_is_new(tmp_path, base_folder):
    start, _ = load_model(base_folder)
    run = prepare_task_run(task_options(tmp_path, base_folder))
    kept = {k: v for k, v in snapshot(run.model).items() if not k.startswith("head.")}
    assert_same_weights(kept, {k: v for k, v in snapshot(start).items() if k in kept})
    assert {k for k in snapshot(run.model) if k.startswith("head.")} == {"head.pool.weight", "head.pool.bias",
                                                                          "head.out.weight", "head.out.bias"}


def test_resume_continues_a_classification_run_exactly(tmp_path, base_folder):
    options = task_options(tmp_path, base_folder, max_steps=30, eval_every=10, save_every=10, log_every=1,
                           dropout=0.1)
    whole = prepare_task_run(options)
    whole.trainer.fit()
    split = prepare_task_run({**options, "out": str(tmp_path / "split")})
    split.trainer.fit(until=20)
    resumed = prepare_task_run({"task": "classify", "out": str(tmp_path / "split"), "resume": True})
    assert resumed.resumed and resumed.trainer.step == 20
    resumed.trainer.fit()
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / name, "train")] for name in ("split", "ft")]
    assert losses[0] == losses[1] and len(losses[0]) == 30
    assert read_metrics(tmp_path / "split", "val") == read_metrics(tmp_path / "ft", "val")
    assert_same_weights(snapshot(resumed.model), snapshot(whole.model))


@pytest.mark.parametrize("arch,pooling", [("encoder", "cls"), ("encoder", "mean"), ("decoder", "last"),
                                          ("decoder", "mean")])
def test_padding_does_not_change_a_sequence_label_logits(arch, pooling):
    """A batch pads its shorter rows; pooling reads the mask, so each row's logits equal its own."""
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16, n_labels=3,
                         pooling=pooling, pad_token_id=0)
    model = build_model(config).eval()
    rows = [torch.randint(1, 40, (n,)) for n in (9, 5, 12)]
    examples = [classify.Example(r.tolist(), [0] * len(r), 0) for r in rows]
    batch = classify.collate(examples, pad_id=0, with_segments=False)
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"]).logits
        alone = torch.cat([model(r[None]).logits for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_label_names_sort_numbers_as_numbers_and_texts_as_texts(tmp_path):
    numbers = read_rows(write_tsv(tmp_path / "n.tsv", [("a", "10"), ("b", "2"), ("c", "1"), ("d", "2.0")]))
    assert classify.label_names(numbers, "label") == ["1", "2", "10"]
    words = read_rows(write_jsonl(tmp_path / "w.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"},
                                                         {"text": "c", "label": 1}]))
    assert classify.label_names(words, "label") == ["1", "ham", "spam"]


def test_lmforge_template_marks_start_separator_and_segments(base_folder):
    _, tokenizer = load_model(base_folder)
    eos = tokenizer.eos_id
    [(ids, types)] = classify.encode(tokenizer, ["ab"], ["cde"], 48, "encoder", "lmforge")
    assert ids == [eos, *tokenizer.encode("ab"), eos, *tokenizer.encode("cde"), eos]  # no bos: eos starts
    assert types == [0, 0, 0, 0, 1, 1, 1, 1]
    [(ids, _)] = classify.encode(tokenizer, ["ab"], None, 48, "decoder", "lmforge")
    assert ids == [*tokenizer.encode("ab"), eos]  # a decoder's last token has read everything


def test_long_inputs_are_cut_to_the_block_longer_side_first(base_folder):
    _, tokenizer = load_model(base_folder)
    [(ids, types)] = classify.encode(tokenizer, ["a" * 30], ["b" * 6], 16, "encoder", "lmforge")
    assert len(ids) == 16 and types.count(1) == 7  # 13 text tokens: 6 + 7 would not fit, the longer gives way
    assert ids.count(tokenizer.token_to_id("b")) == 6


def test_unusable_rows_are_skipped_and_reported_by_line(tmp_path, base_folder, capsys):
    rows = keyword_rows(100, seed=4) + [("", "pos"), ("no label", "")]
    train = write_tsv(tmp_path / "train.tsv", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "awful film", "label": "neg"}, {"text": "meh", "label": "meh"}])
    code = main(["finetune", "--model", str(base_folder), "--task", "classify", "--data", str(train), "--val-data",
                 str(val), "--max-steps", "2", "--no-progress", "--no-bf16", "--out", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert code == 0
    assert "train.tsv: skipped 2 row(s): 1 with no text (line 102); 1 with no label (line 103)" in out
    assert "val.jsonl: skipped 1 row(s): 1 with a label the model does not know ('meh') (line 2)" in out


def test_no_usable_row_is_one_line_and_exit_2(tmp_path, base_folder, capsys):
    train = write_tsv(tmp_path / "train.tsv", [("good", ""), ("bad", "")])
    code = main(["finetune", "--model", str(base_folder), "--task", "classify", "--data", str(train),
                 "--no-progress", "--out", str(tmp_path / "ft")])
    assert code == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"lmforge finetune: error: {train}: classification needs at least two labels; found []")


@pytest.mark.parametrize("argv,message", [
    (["--task", "classify", "--text-column", "review"], "has no column 'review' for the text; it has label, sentence"),
    (["--task", "regress"], "argument --task: invalid choice: 'regress'"),
    (["--text-column", "review"], "--text-column need --task"),
    (["--task", "classify", "--n-layer", "3"], "unrecognized arguments: --n-layer 3"),
])
def test_bad_task_flags_are_one_line_and_exit_2(tmp_path, base_folder, capsys, argv, message):
    train = write_tsv(tmp_path / "train.tsv", keyword_rows(20, seed=5))
    with pytest.raises(SystemExit) if "invalid choice" in message or "unrecognized" in message else _no_exit():
        code = main(["finetune", "--model", str(base_folder), "--data", str(train), "--out", str(tmp_path / "ft"),
                     "--no-progress", *argv])
        assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_predict_and_eval_on_the_fine_tuned_folder(tmp_path, base_folder, capsys):
    prepare_task_run(task_options(tmp_path, base_folder)).trainer.fit()
    out = str(tmp_path / "ft")
    capsys.readouterr()
    assert main(["predict", out, "--text", "the film was superb", "--json"]) == 0
    [result] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result["label"] == "pos" and [s["label"] for s in result["scores"]][0] == "pos"
    assert sum(s["score"] for s in result["scores"]) == pytest.approx(1.0)

    val_rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert main(["predict", out, "--input", str(tmp_path / "val.jsonl"), "--json"]) == 0
    predicted = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert main(["eval", out, "--data", str(tmp_path / "val.jsonl"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["examples"] == len(val_rows)
    assert scored["accuracy"] == pytest.approx(accuracy(predicted, [r["label"] for r in val_rows]))


def test_predict_refuses_a_language_model_and_ambiguous_inputs(base_folder, capsys):
    assert main(["predict", str(base_folder), "--text", "x"]) == 2
    assert "is a language model with no task" in one_line_error(capsys.readouterr().err)
    assert main(["predict", str(base_folder)]) == 2
    assert one_line_error(capsys.readouterr().err).endswith("give exactly one of --input FILE or --text TEXT")


def test_tabular_files_read_as_their_format_says(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('sentence\tlabel\nsaid "hi\tpos\n', encoding="utf-8")  # GLUE TSV: a quote is text
    assert read_rows(tsv)[0].fields == {"sentence": 'said "hi', "label": "pos"}
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('text,label\n"one, two",neg\n', encoding="utf-8")
    assert read_rows(csv_file)[0].fields == {"text": "one, two", "label": "neg"}
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"b.jsonl, line 2: not JSON"):
        read_rows(bad)
    with pytest.raises(LmforgeError, match=r"unknown file type '.xml'"):
        read_rows(tmp_path / "c.xml")


def test_early_stopping_keeps_the_most_accurate_classifier(tmp_path, base_folder):
    run = prepare_task_run(task_options(tmp_path, base_folder, max_steps=50, eval_every=10,
                                        early_stopping_patience=2))
    weights_at = script_validation(run.trainer, [0.6, 0.9, 0.9, 0.7], metric="accuracy")
    summary = run.trainer.fit()
    assert summary["step"] == 40 and summary["best"] == {"metric": "accuracy", "value": 0.9, "step": 20}
    assert_same_weights(snapshot(load_model(tmp_path / "ft")[0]), weights_at[20])
    assert read_task(tmp_path / "ft") == read_task(tmp_path / "ft" / "best")


def test_augmentation_deletes_or_swaps_content_tokens_only_and_replays_the_same():
    specials = {0, 1}
    example = classify.Example([1, *range(10, 30), 0], [0] * 22, 1)
    deleted = classify.augment(example, torch.Generator().manual_seed(5), "delete", 0.3, specials)
    assert deleted.input_ids[0] == 1 and deleted.input_ids[-1] == 0 and 8 <= len(deleted.input_ids) < 22
    assert set(deleted.input_ids) < set(example.input_ids) and len(deleted.token_type_ids) == len(deleted.input_ids)
    swapped = classify.augment(example, torch.Generator().manual_seed(5), "swap", 0.3, specials)
    assert sorted(swapped.input_ids) == sorted(example.input_ids) and swapped.input_ids != example.input_ids
    assert swapped.input_ids[0] == 1 and swapped.input_ids[-1] == 0
    again = classify.augment(example, torch.Generator().manual_seed(5), "swap", 0.3, specials)
    assert again == swapped
    only_one = classify.Example([1, 42, 0], [0, 0, 0], 0)
    kept = classify.augment(only_one, torch.Generator().manual_seed(0), "delete", 0.99, specials)
    assert kept.input_ids == [1, 42, 0]


def test_augmented_training_resumes_exactly_and_sees_new_noise_each_epoch(tmp_path, base_folder):
    options = task_options(tmp_path, base_folder, max_steps=24, eval_every=12, save_every=12, log_every=1,
                           augment="delete", augment_prob=0.2, label_smoothing=0.1, batch_size=32)
    whole = prepare_task_run(options)
    sampler = whole.trainer.sampler
    first_epoch_batch = sampler.next_batch()["input_ids"]
    sampler.load_state_dict({"epoch": 0, "position": 0})
    assert torch.equal(sampler.next_batch()["input_ids"], first_epoch_batch)  # replayable from the state
    sampler.load_state_dict({"epoch": 0, "position": 0})
    whole.trainer.fit()
    split = prepare_task_run({**options, "out": str(tmp_path / "split")})
    split.trainer.fit(until=12)
    resumed = prepare_task_run({"task": "classify", "out": str(tmp_path / "split"), "resume": True})
    assert resumed.trainer.config.augment == "delete" and resumed.model.label_smoothing == 0.1
    resumed.trainer.fit()
    losses = [[r["loss"] for r in read_metrics(tmp_path / name, "train")] for name in ("split", "ft")]
    assert losses[0] == losses[1]


@torch.no_grad()
def test_label_smoothing_changes_the_training_loss_not_the_evaluation(tmp_path, base_folder):
    run = prepare_task_run(task_options(tmp_path, base_folder, label_smoothing=0.2))
    batch = run.trainer.sampler.next_batch()
    run.model.train()
    smoothed = float(run.model(**batch).loss)
    run.model.label_smoothing = 0.0
    plain = float(run.model(**batch).loss)
    logits = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.2)
    run.model.label_smoothing = 0.2
    assert smoothed != plain and smoothed == pytest.approx(float(expected), rel=1e-5)
    run.model.eval()
    assert float(run.model(**batch).loss) == pytest.approx(plain, rel=1e-5)


def test_l1_penalty_pulls_weights_toward_zero(tmp_path, base_folder):
    norms = {}
    for l1 in (0.0, 0.05):
        run = prepare_task_run(task_options(tmp_path, base_folder, out=f"l1-{l1}", l1_penalty=l1, max_steps=20,
                                            weight_decay=0.0))
        run.trainer.fit()
        norms[l1] = sum(float(p.detach().abs().sum()) for p in run.trainer.optimizer.param_groups[0]["params"])
    assert norms[0.05] < 0.8 * norms[0.0], norms


def test_task_only_regularisers_are_refused_for_language_models(tmp_path, capsys):
    from helpers import write_corpus

    corpus = write_corpus(tmp_path)
    assert main(["pretrain", "--data", str(corpus), "--tokenizer", "char", "--label-smoothing", "0.1",
                 "--out", str(tmp_path / "lm")]) == 2
    assert one_line_error(capsys.readouterr().err).endswith(
        "--label-smoothing apply to fine-tuning for a task (finetune --task)")


def test_sampler_visits_every_example_once_per_epoch_in_length_buckets():
    rng = random.Random(0)
    examples = [classify.Example([5] * rng.randint(3, 60), [0], n) for n in range(1000)]  # label = index
    pad = partial(classify.collate, pad_id=0, with_segments=False)
    sampler = ExampleSampler(examples, batch_size=10, seed=1, collate=pad)
    seen, padding, real = [], 0, 0
    for _ in range(100):  # one epoch: 1000 examples in batches of 10
        batch = sampler.next_batch()
        seen += batch["labels"].tolist()
        padding += int((batch["attention_mask"] == 0).sum())
        real += int(batch["attention_mask"].sum())
    assert sorted(seen) == list(range(1000)) and sampler.epoch == 0
    assert padding < 0.05 * real  # random batches of lengths 3..60 would pad ~60% as much as they hold
    assert sampler.next_batch()["labels"].tolist() != seen[:10]  # a new epoch, a new order

    halves = [ExampleSampler(examples, batch_size=5, seed=1, collate=pad, rank=r, world_size=2) for r in (0, 1)]
    whole = ExampleSampler(examples, batch_size=10, seed=1, collate=pad)
    for _ in range(3):
        shares = [h.next_batch()["labels"].tolist() for h in halves]
        assert shares[0] + shares[1] == whole.next_batch()["labels"].tolist()
