"""`lmforge finetune` / prepare_run(init=...): a run that starts from a trained model folder
(lmforge's or a transformers one) keeps its weights, architecture and tokenizer, trains on new
text, resumes from its own folder, and refuses what would silently change the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401  (token_cache and one_thread are autouse fixtures)
    ENGLISH,
    assert_same_weights,
    one_line_error,
    one_thread,
    read_metrics,
    snapshot,
    tiny_options,
    token_cache,
    write_corpus,
)

from lmforge.cli import main
from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.model import build_model
from lmforge.model_folder import load_model, save_model
from lmforge.tokenize import Tokenizer
from lmforge.train.pretrain import FINETUNE_DEFAULTS, prepare_run

NEW_TEXT = "She sells sea shells by the sea shore. The shells she sells are surely sea shells.\n" * 60


@pytest.fixture()
def trained(tmp_path) -> Path:
    """A 1-layer char model pretrained for 40 steps: the folder a fine-tune starts from."""
    run = prepare_run(tiny_options(tmp_path, out="base"))
    run.trainer.fit()
    return tmp_path / "base"


def finetune_options(tmp_path: Path, init: Path, out: str = "ft", **overrides) -> dict:
    data = write_corpus(tmp_path / "new", NEW_TEXT)
    options = dict(init=str(init), data=[str(data)], out=str(tmp_path / out), batch_size=4, lr=3e-3,
                   warmup_steps=0, max_steps=20, eval_every=1000, eval_batches=4, save_every=1000, log_every=1,
                   seed=3, progress=False)
    return {**options, **overrides}


def test_run_starts_from_the_trained_model_and_learns_the_new_text(tmp_path, trained):
    start, start_tokenizer = load_model(trained)
    run = prepare_run(finetune_options(tmp_path, trained))
    assert_same_weights(snapshot(run.model), snapshot(start))
    assert run.tokenizer.vocab_size == start_tokenizer.vocab_size
    assert run.tokenizer.encode(NEW_TEXT[:80]) == start_tokenizer.encode(NEW_TEXT[:80])
    assert run.model.config == start.config
    before = run.trainer.evaluate(full=True)["loss"]
    run.trainer.fit()
    after = run.trainer.evaluate(full=True)["loss"]
    assert after < before - 0.3, (before, after)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved == json.loads((trained / "config.json").read_text())
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["init"] == str(trained.resolve())
    assert Tokenizer.load(tmp_path / "ft" / "tokenizer.json").vocab_size == start_tokenizer.vocab_size


@pytest.mark.parametrize(("arch", "objective"), [("encoder", "mlm"), ("encoder-decoder", "denoise")])
def test_the_objective_follows_the_start_model(tmp_path, arch, objective):
    base = prepare_run(tiny_options(tmp_path, out="base", arch=arch, max_steps=5))
    base.trainer.fit()
    run = prepare_run(finetune_options(tmp_path, tmp_path / "base", max_steps=5))
    assert run.trainer.objective.name == objective and run.model.config.arch == arch
    assert_same_weights(snapshot(run.model), snapshot(base.model))
    run.trainer.fit()
    assert len(read_metrics(tmp_path / "ft", "train")) == 5


def test_dropout_may_change_but_the_architecture_and_tokenizer_may_not(tmp_path, trained):
    run = prepare_run(finetune_options(tmp_path, trained, dropout=0.1))
    assert run.model.config.dropout == 0.1
    assert_same_weights(snapshot(run.model), snapshot(load_model(trained)[0]))
    for extra, named in [({"n_layer": 2}, "n_layer"), ({"tokenizer": "char"}, "tokenizer"),
                         ({"n_embd": 64, "position": "learned"}, "n_embd, position")]:
        with pytest.raises(LmforgeError, match=f"^the model and tokenizer come from {trained}; drop {named}$"):
            prepare_run(finetune_options(tmp_path, trained, out="refused", **extra))


def test_a_sequence_classifier_is_refused(tmp_path, trained):
    _, tokenizer = load_model(trained)
    classifier = tmp_path / "classifier"
    config = ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                         block_size=16, n_labels=2)
    save_model(build_model(config), classifier, tokenizer)
    with pytest.raises(LmforgeError, match="is a sequence classifier; a training run continues a language model"):
        prepare_run(finetune_options(tmp_path, classifier))


def test_seq_len_trains_on_windows_shorter_than_the_block(tmp_path, trained):
    run = prepare_run(finetune_options(tmp_path, trained, seq_len=8))
    x, y = run.trainer.sampler.next_batch()
    assert x.shape == y.shape == (4, 8)
    assert run.trainer.tokens_per_step == 4 * 8
    run.trainer.fit(until=2)
    widths = set()
    hook = run.model.register_forward_pre_hook(lambda module, args, kwargs: widths.add(kwargs["input_ids"].shape[1]),
                                               with_kwargs=True)
    run.trainer.evaluate(full=True)  # evaluation uses the same windows
    hook.remove()
    assert widths and max(widths) == 8
    with pytest.raises(LmforgeError, match="^seq_len 17 is longer than the model's block_size 16$"):
        prepare_run(finetune_options(tmp_path, trained, out="long", seq_len=17))
    with pytest.raises(LmforgeError, match="^seq_len must be at least 2; got 1$"):
        TrainConfig(seq_len=1)


def test_resume_needs_only_the_folder_and_keeps_the_run_own_settings(tmp_path, trained):
    """A resumed fine-tune keeps its start model, its learning rate (not the fine-tune defaults)
    and continues exactly like an uninterrupted run."""
    common = dict(max_steps=12, save_every=6, lr=5e-4, warmup_steps=2)
    whole = prepare_run(finetune_options(tmp_path, trained, out="whole", **common), train_defaults=FINETUNE_DEFAULTS)
    whole.trainer.fit()
    cut = prepare_run(finetune_options(tmp_path, trained, out="cut", **common), train_defaults=FINETUNE_DEFAULTS)
    cut.trainer.fit(until=6)
    del cut
    resumed = prepare_run({"out": str(tmp_path / "cut"), "resume": True}, train_defaults=FINETUNE_DEFAULTS)
    assert resumed.resumed and resumed.trainer.step == 6 and resumed.trainer.config.lr == 5e-4
    assert resumed.init == str(trained.resolve())
    resumed.trainer.fit()
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / name, "train")] for name in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    assert_same_weights(snapshot(resumed.model), snapshot(whole.model))


def test_resume_before_the_first_checkpoint_starts_the_same_run_again(tmp_path, trained):
    """A fine-tune that died before its first checkpoint restarts from its start model, data and
    settings: the folder alone is enough."""
    first = prepare_run(finetune_options(tmp_path, trained, lr=5e-4, seq_len=8), train_defaults=FINETUNE_DEFAULTS)
    start = snapshot(first.model)
    del first
    again = prepare_run({"out": str(tmp_path / "ft"), "resume": True}, train_defaults=FINETUNE_DEFAULTS,
                        require_init=True)
    assert not again.resumed and again.init == str(trained.resolve())
    assert again.trainer.config.lr == 5e-4 and again.trainer.seq_len == 8
    assert_same_weights(snapshot(again.model), start)


def test_runs_that_would_lose_or_confuse_a_model_are_refused(tmp_path, trained):
    plain = tmp_path / "plain"  # a model folder that is not a run (as `convert` writes): nothing else guards it
    model, tokenizer = load_model(trained)
    save_model(model, plain, tokenizer)
    with pytest.raises(LmforgeError, match="^--out must not be the --model folder: the run would overwrite the model"):
        prepare_run(finetune_options(tmp_path, plain, out="plain"))
    run = prepare_run(finetune_options(tmp_path, trained, max_steps=2, save_every=2))
    run.trainer.fit()
    other = tmp_path / "other"
    with pytest.raises(LmforgeError, match=f"^{tmp_path / 'ft'} started from {trained.resolve()}; "
                                            "resume it without --model$"):
        prepare_run({"out": str(tmp_path / "ft"), "resume": True, "init": str(other)})
    with pytest.raises(LmforgeError, match=f"^--model is required: {trained} holds no fine-tuning run to resume$"):
        prepare_run({"out": str(trained), "resume": True}, require_init=True)


def test_cli_finetune_applies_its_defaults_and_resumes(tmp_path, trained, capsys):
    data = write_corpus(tmp_path / "new", NEW_TEXT)
    out = tmp_path / "cli"
    args = ["finetune", "--model", str(trained), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"starting from {trained}" in printed and "done: step 4" in printed
    new_chars = sum(NEW_TEXT.count(c) for c in set(NEW_TEXT) - set(ENGLISH))  # 'S': the base model never saw it
    share = new_chars / len(NEW_TEXT)
    printed_share = re.search(r"note: ([\d.]+)% of the training tokens are unknown to the tokenizer", printed)
    assert share > 0.01 and printed_share and abs(float(printed_share[1]) / 100 - share) < 0.005
    config = json.loads((out / "train_config.json").read_text())
    not_given = ("lr", "min_lr", "warmup_steps", "eval_every")  # the flags above set max_steps and save_every
    assert {k: config[k] for k in not_given} == {k: FINETUNE_DEFAULTS[k] for k in not_given}
    assert main(["finetune", "--out", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out, "train") if r["step"] % 2 == 0][-1] == 6


@pytest.mark.parametrize("extra,message", [
    ([], "lmforge finetune: error: --model is required: the model folder (lmforge or Hugging Face) to start from"),
    (["--model", "missing"], "lmforge finetune: error: model folder not found: missing"),
    (["--model", "{base}", "--config", "{arch_config}"],
     "lmforge finetune: error: the model and tokenizer come from {base}; drop n_layer"),
])
def test_cli_mistakes_are_one_line_exit_2(tmp_path, trained, capsys, extra, message):
    data = write_corpus(tmp_path / "new", NEW_TEXT)
    arch_config = tmp_path / "arch.yaml"
    arch_config.write_text("n_layer: 3\n")
    names = {"base": trained, "arch_config": arch_config}
    args = ["finetune", "--data", str(data), "--out", str(tmp_path / "x"), *[a.format(**names) for a in extra]]
    assert main(args) == 2
    assert one_line_error(capsys.readouterr().err) == message.format(**names)


def test_config_files_name_the_start_model_only_in_finetune(tmp_path, trained, capsys):
    data = write_corpus(tmp_path / "new", NEW_TEXT)
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {trained}\nmax_steps: 2\nprogress: false\n")
    assert main(["finetune", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "run.json").read_text())["init"] == str(trained.resolve())
    capsys.readouterr()
    config.write_text(f"init: {trained}\n")
    assert main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "b")]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        "lmforge pretrain: error: unknown option(s): init (to start from a model folder: lmforge finetune --model)")


def test_cli_finetune_has_no_architecture_flags(tmp_path, trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(trained), "--out", str(tmp_path / "x"), "--n-layer", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --n-layer 2" in one_line_error(capsys.readouterr().err)


def test_finetune_a_transformers_gpt2_folder(tmp_path):
    """A Hugging Face folder is converted on load: the run starts from its exact weights."""
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.train("bpe", [NEW_TEXT, "the quick brown fox. " * 50], vocab_size=300)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "hf-gpt2"
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    run = prepare_run(finetune_options(tmp_path, folder, seq_len=32, max_steps=15))
    ids = torch.tensor([tokenizer.encode(NEW_TEXT[:100])])
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)  # no dropout
    before = run.trainer.evaluate(full=True)["loss"]
    run.trainer.fit()
    assert run.trainer.evaluate(full=True)["loss"] < before - 0.5
    reloaded, _ = load_model(tmp_path / "ft")
    assert_same_weights(snapshot(reloaded), snapshot(run.model.eval()))
