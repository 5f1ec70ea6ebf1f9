"""`lmforge search`: a space file, trials that are real tiny training runs, pruning on the trainer's
evaluations, a study that resumes after a kill and that several processes share, and the results."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import (  # noqa: F401  (token_cache and one_thread are autouse fixtures)
    one_line_error,
    one_thread,
    read_metrics,
    token_cache,
    write_corpus,
)
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.finetune.run import TaskTrainer
from lmforge.model import LanguageModel
from lmforge.model_folder import load_model, save_model
from lmforge.search.space import read_space
from lmforge.search.study import MACHINE, is_surplus, requeue_dead_here
from lmforge.tokenize import Tokenizer
from lmforge.train.trainer import Trainer

LR_AND_DROPOUT = "lr: {low: 1e-3, high: 1e-2, log: true}\ndropout: {low: 0.0, high: 0.2}\n"


def pretrain_command(tmp_path: Path, max_steps: int = 4) -> list[str]:
    """A 1-layer char-level decoder: a trial trains in a fraction of a second."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(tmp_path)
    return ["pretrain", "--data", str(corpus), "--tokenizer", "char", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--max-steps", str(max_steps),
            "--eval-every", "2", "--eval-batches", "2", "--warmup-steps", "1", "--seed", "7", "--no-bf16"]


def write_space(tmp_path: Path, text: str = LR_AND_DROPOUT, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def search(tmp_path: Path, *flags: str, space: str = LR_AND_DROPOUT, out: str = "search", command=None) -> int:
    command = pretrain_command(tmp_path) if command is None else command
    return main(["search", "--space", str(write_space(tmp_path, space)), "--out", str(tmp_path / out), *flags,
                 "--", *command])


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- the space file


def test_the_space_file_schema(tmp_path):
    space = read_space(str(write_space(tmp_path, (
        "lr: {low: 1e-4, high: 3e-3, log: true}\n"  # YAML reads 1e-4 as a string: still a number
        "dropout: {low: 0.0, high: 0.3, step: 0.1}\n"
        "n-layer: {low: 2, high: 4}\n"
        "batch_size: {choices: [16, 32]}\n"
        "activation: {choices: [gelu, relu]}\n"
        "weight_decay: {low: 0, high: 1}\n"))), lambda sample: None)
    assert space == {
        "lr": FloatDistribution(1e-4, 3e-3, log=True),
        "dropout": FloatDistribution(0.0, 0.3, step=0.1),
        "n_layer": IntDistribution(2, 4),
        "batch_size": CategoricalDistribution([16, 32]),
        "activation": CategoricalDistribution(["gelu", "relu"]),
        "weight_decay": FloatDistribution(0.0, 1.0),  # a float option: int bounds still mean a float range
    }


SCHEMA = "give {low: A, high: B} (optionally log: true, or step: S) or {choices: [...]}"
BAD_SPACES = [
    ("learning_rate: {low: 0.1, high: 0.2}", "unknown option(s): learning_rate"),
    ("lr: {low: 0.01, high: 0.001}", "lr: low (0.01) must be below high (0.001)"),
    ("lr: {min: 0.1, max: 0.2}", f"lr: unknown key(s) max, min; {SCHEMA}"),
    ("lr: 0.001", f"lr: {SCHEMA}; got 0.001"),
    ("lr: {low: 0.001}", "lr: a range needs both low and high"),
    ("dropout: {low: 0.0, high: 0.3, log: true}", "dropout: a log range needs low > 0 and no step"),
    ("dropout: {low: 0.0, high: 0.3, step: 0.2}", "dropout: step must be positive and divide high - low; got 0.2"),
    ("n_layer: {low: 1.5, high: 4}", "n_layer: the option takes whole numbers; give integer low, high and step"),
    ("activation: {low: 1, high: 2}", "activation: the option is not a number; give choices"),
    ("lr: {low: null, high: 1}", "lr: low, high and step must be numbers"),
    ("n_layer: {choices: [2, 2.5]}", "n_layer: the option takes whole numbers; got 2.5"),
    ("bias: {choices: [1, 0]}", "bias: the option takes true or false; got 1"),
    ("batch_size: {choices: []}", "batch_size: choices must be a non-empty list"),
    ("batch_size: {choices: [16, 16]}", "batch_size: choices repeat a value"),
    ("batch_size: {choices: [16], low: 1}", "batch_size: choices go alone, without low"),
    ("out: {choices: [a, b]}", "out cannot be searched"),
    ("{}", "the space is empty; name at least one option"),
]


@pytest.mark.parametrize(("space", "message"), BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_a_bad_space_is_one_line_and_nothing_is_written(tmp_path, capsys, space, message):
    assert search(tmp_path, "--trials", "2", space=space) == 2
    assert one_line_error(capsys.readouterr().err) == f"lmforge search: error: {tmp_path / 'space.yaml'}: {message}"
    assert not (tmp_path / "search").exists()


BAD_FLAGS = [
    (["--trials", "0"], None, "--trials must be at least 1; got 0"),
    (["--trials", "2", "--jobs", "0"], None, "--jobs must be at least 1; got 0"),
    (["--trials", "2", "--timeout", "0"], None, "--timeout must be positive; got 0.0"),
    (["--trials", "2", "--sampler", "grid"], None,
     "--sampler grid needs choices or an integer range for every option; lr is a log float range"),
    (["--trials", "2"], [], "give the training command after --: lmforge search ... -- pretrain|finetune FLAGS"),
    (["--trials", "2"], ["generate", "model"], "the command after -- must start with pretrain or finetune; "
                                                "got 'generate'"),
    (["--trials", "2"], ["pretrain", "--data", "x.txt", "--out", "run"],
     "drop --out from the training command: each trial writes OUT/trials/trial-N"),
    (["--trials", "2"], ["pretrain", "--data", "x.txt", "--resume"],
     "drop --resume from the training command: run the same search again"),
]


@pytest.mark.parametrize(("flags", "command", "message"), BAD_FLAGS, ids=[m for *_, m in BAD_FLAGS])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, command, message):
    assert search(tmp_path, *flags, command=command) == 2
    assert one_line_error(capsys.readouterr().err) == f"lmforge search: error: {message}"
    assert not (tmp_path / "search").exists()


def test_argparse_and_storage_mistakes_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        search(tmp_path, "--trials", "2", "--sampler", "bayes")
    assert exit_info.value.code == 2
    assert one_line_error(capsys.readouterr().err).startswith(
        "lmforge search: error: argument --sampler: invalid choice: 'bayes'")
    assert search(tmp_path, "--trials", "2", "--storage", "nosuchdb://x") == 2
    assert one_line_error(capsys.readouterr().err).startswith("lmforge search: error: cannot open the study storage: ")


def test_a_task_run_refuses_to_search_what_its_model_fixes(tmp_path, capsys):
    command = ["finetune", "--model", "base", "--task", "classify", "--data", "train.tsv"]
    assert search(tmp_path, "--trials", "2", space="n_layer: {low: 1, high: 2}", command=command) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"lmforge search: error: {tmp_path / 'space.yaml'}: the model and tokenizer come from base; drop n_layer")


# --------------------------------------------------------------------------- searches


def test_a_search_writes_results_the_best_folder_and_the_history(tmp_path, capsys):
    from PIL import Image

    assert search(tmp_path, "--trials", "3", "--sampler", "random", "--seed", "1") == 0
    printed = capsys.readouterr().out
    out = tmp_path / "search"
    found = results(out)
    rows = found["trials"]
    assert found["metric"] == "loss" and found["direction"] == "minimize"
    assert [r["trial"] for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"COMPLETE"}
    assert all(1e-3 <= r["params"]["lr"] <= 1e-2 and 0 <= r["params"]["dropout"] <= 0.2 for r in rows)
    assert all(r["step"] == 4 and r["seconds"] > 0 for r in rows)
    # each trial's value is its run's final validation loss, from its own folder
    for r in rows:
        assert r["loss"] == read_metrics(out / "trials" / f"trial-{r['trial']}", "val")[-1]["loss"]
    best = min(rows, key=lambda r: r["loss"])
    assert found["best"]["trial"] == best["trial"] and found["best"]["loss"] == best["loss"]
    assert len({r["loss"] for r in rows}) == 3  # the values differ, so the minimum is a real choice
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(int(t["trial"]), t["state"], float(t["loss"]), float(t["lr"])) for t in table] == [
        (r["trial"], r["state"], r["loss"], r["params"]["lr"]) for r in rows]
    assert (out / "best").resolve() == (out / "trials" / f"trial-{best['trial']}").resolve()
    model, _ = load_model(out / "best")
    assert model.config.n_layer == 1
    with Image.open(out / "history.png") as image:
        assert image.format == "PNG" and image.size == (800, 450)
    assert "3 trials: 3 complete, 0 pruned, 0 failed" in printed and f"best: trial {best['trial']}, loss" in printed

    assert search(tmp_path, "--trials", "3", "--sampler", "random", "--seed", "1") == 0  # done: nothing more runs
    assert "trial 3:" not in capsys.readouterr().out and len(results(out)["trials"]) == 3


def test_a_grid_visits_every_choice_once(tmp_path, capsys):
    assert search(tmp_path, "--trials", "5", "--sampler", "grid", space="batch_size: {choices: [2, 4]}") == 0
    assert "note: the grid has 2 points; each runs once" in capsys.readouterr().out
    rows = results(tmp_path / "search")["trials"]
    assert sorted(r["params"]["batch_size"] for r in rows) == [2, 4] and {r["state"] for r in rows} == {"COMPLETE"}


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_seeded_sampler_draws_the_same_values_again(tmp_path, sampler):
    drawn = []
    for out, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert search(tmp_path, "--trials", "1", "--sampler", sampler, "--seed", seed, out=out,
                      command=pretrain_command(tmp_path, max_steps=2)) == 0
        drawn.append([r["params"] for r in results(tmp_path / out)["trials"]])
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]


def test_pruning_stops_a_bad_trial_at_its_first_evaluation(tmp_path, capsys, monkeypatch):
    def evaluate(self, *args, **kwargs):  # trial 3 is hopeless from the start; the others all alike
        loss = 9.0 if self.run_dir.name == "trial-3" else 2.0 - 0.01 * self.step
        return {"loss": loss, "perplexity": math.exp(loss)}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert search(tmp_path, "--trials", "4", "--sampler", "random", "--seed", "0",
                  command=pretrain_command(tmp_path, max_steps=6)) == 0
    assert "trial 3: pruned at step 2" in capsys.readouterr().out
    out = tmp_path / "search"
    rows = results(out)["trials"]
    assert [(r["state"], r["step"]) for r in rows] == [("COMPLETE", 6)] * 3 + [("PRUNED", 2)]
    assert rows[3]["loss"] == 9.0 and rows[0]["loss"] == pytest.approx(1.94)
    assert [r["step"] for r in read_metrics(out / "trials" / "trial-3", "val")] == [2]  # it stopped there
    assert [r["step"] for r in read_metrics(out / "trials" / "trial-2", "val")] == [2, 4, 6]
    with open(out / "results.csv", newline="") as handle:
        assert [t["state"] for t in csv.DictReader(handle)] == ["COMPLETE"] * 3 + ["PRUNED"]


def test_a_classifier_search_maximises_the_best_accuracy_early_stopping_kept(tmp_path, monkeypatch):
    texts = [f"{word} film {n}" for n in range(40) for word in ("great", "awful")]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{t}\t{'pos' if t.startswith('great') else 'neg'}\n" for t in texts), encoding="utf-8")
    tokenizer = Tokenizer.train("char", texts)
    config = ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                         block_size=32, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                         mask_token_id=tokenizer.mask_id)
    save_model(LanguageModel(config), tmp_path / "base", tokenizer)

    def evaluate(self, *args, **kwargs):  # better with the higher lr; worse at the last step than before
        accuracy = (0.9 if self.config.lr > 1e-3 else 0.6) - (0.2 if self.step == 4 else 0.0)
        return {"loss": 1.0, "accuracy": accuracy, "macro_f1": accuracy}

    monkeypatch.setattr(TaskTrainer, "evaluate", evaluate)
    command = ["finetune", "--model", str(tmp_path / "base"), "--task", "classify", "--data",
               str(tmp_path / "train.tsv"), "--batch-size", "8", "--max-steps", "4", "--eval-every", "2",
               "--early-stopping-patience", "5", "--no-bf16"]
    assert search(tmp_path, "--trials", "2", "--sampler", "grid", space="lr: {choices: [0.003, 0.0001]}",
                  command=command) == 0
    found = results(tmp_path / "search")
    assert found["metric"] == "accuracy" and found["direction"] == "maximize"
    assert sorted((r["params"]["lr"], r["accuracy"]) for r in found["trials"]) == [(0.0001, 0.6), (0.003, 0.9)]
    assert found["best"]["params"] == {"lr": 0.003}
    assert load_model(tmp_path / "search" / "best")[0].config.n_labels == 2

    lora_space = "lora_rank: {choices: [2, 4]}"  # LoRA options are searchable too: each trial an adapter run
    assert search(tmp_path, "--trials", "2", "--sampler", "grid", space=lora_space, out="lora",
                  command=[*command, "--lora-targets", "q,v"]) == 0
    ranks = sorted(r["params"]["lora_rank"] for r in results(tmp_path / "lora")["trials"])
    assert ranks == [2, 4]
    adapters = [json.loads((tmp_path / "lora" / "trials" / f"trial-{n}" / "adapter.json").read_text())["rank"]
                for n in (0, 1)]
    assert sorted(adapters) == [2, 4]


# --------------------------------------------------------------------------- the study: resume, sharing


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_trial_left_running_by_a_killed_search_runs_again(tmp_path, capsys):
    assert search(tmp_path, "--trials", "2", "--sampler", "random", "--seed", "1") == 0
    out = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    killed = study.ask({"lr": FloatDistribution(1e-3, 1e-2, log=True), "dropout": FloatDistribution(0.0, 0.2)})
    killed.set_user_attr("worker", {"machine": MACHINE, "pid": dead_pid()})  # as a SIGKILLed search leaves it
    capsys.readouterr()

    assert search(tmp_path, "--trials", "3", "--sampler", "random", "--seed", "1", "--timeout", "120") == 0
    rows = results(out)["trials"]
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"), (3, "COMPLETE")]
    assert rows[3]["params"] == rows[2]["params"] == killed.params  # the killed trial's values, trained again
    assert "its values ran again" in rows[2]["note"]

    assert search(tmp_path, "--trials", "3", space="lr: {low: 1e-3, high: 1e-2}") == 2  # another space
    assert one_line_error(capsys.readouterr().err) == (
        "lmforge search: error: the study 'search' searched another space or metric; "
        "give the same space, or another --out")


def test_ctrl_c_puts_the_running_trial_back_in_the_queue(tmp_path, capsys, monkeypatch):
    evaluate = Trainer.evaluate

    def interrupted_in_trial_1(self, *args, **kwargs):
        if self.run_dir.name == "trial-1":
            raise KeyboardInterrupt
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", interrupted_in_trial_1)
    assert search(tmp_path, "--trials", "2", "--sampler", "random", "--seed", "1") == 130
    assert one_line_error(capsys.readouterr().err) == "lmforge search: interrupted"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == study.trials[1].params
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert search(tmp_path, "--trials", "2", "--sampler", "random", "--seed", "1") == 0
    assert [(r["trial"], r["state"]) for r in results(tmp_path / "search")["trials"]] == [
        (0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]


def test_only_a_dead_process_of_this_machine_has_its_trial_requeued(tmp_path, monkeypatch):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    workers = [{"machine": MACHINE, "pid": dead_pid()}, {"machine": "elsewhere/0", "pid": dead_pid()},
               {"machine": MACHINE, "pid": os.getpid()}, None]
    for worker in workers:
        trial = study.ask({"lr": FloatDistribution(0.1, 1.0)})
        if worker:
            trial.set_user_attr("worker", worker)
    requeue_dead_here(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    monkeypatch.setattr("lmforge.search.study.STALE_AFTER_SECONDS", 0)  # a trial that never said who runs it
    requeue_dead_here(study)
    trials = study.get_trials()
    assert [t.state for t in trials][3:] == [TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert trials[4].params == trials[0].params and trials[4].system_attrs["retry_of"] == 0
    assert trials[5].params == trials[3].params and trials[5].system_attrs["retry_of"] == 3


def test_a_trial_started_when_the_study_is_full_is_surplus(tmp_path):
    """Workers racing for the last places: the trials numbered first keep them."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    lr = {"lr": FloatDistribution(0.1, 1.0)}
    for state, attrs in [(TrialState.COMPLETE, {}), (TrialState.PRUNED, {}), (TrialState.FAIL, {"error": "diverged"}),
                         (TrialState.FAIL, {})]:  # the last one was killed: its values run again, it does not count
        study.add_trial(optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                                  params={"lr": 0.5}, distributions=lr, user_attrs=attrs))
    study.ask(lr)  # another worker's, running
    late = study.ask(lr)
    assert is_surplus(late, wanted=4) and not is_surplus(late, wanted=5)


def test_two_searches_share_one_study_and_run_exactly_the_trials_asked(tmp_path):
    """Two "machines" (separate folders, one database); one of them runs two worker processes."""
    command = pretrain_command(tmp_path)
    space = write_space(tmp_path)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(machine: str, *flags: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "search", "--space", str(space), "--trials", "4", "--storage",
             storage, "--sampler", "random", "--out", str(tmp_path / machine / "search"), *flags, "--", *command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    processes = [start("m1"), start("m2", "--jobs", "2")]
    for process in processes:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
    study = optuna.load_study(study_name="search", storage=storage)
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    ran_here = {m: {int(p.name.split("-")[1]) for p in (tmp_path / m / "search" / "trials").glob("trial-*")}
                for m in ("m1", "m2")}
    assert ran_here["m1"] | ran_here["m2"] == {t.number for t in finished} and not ran_here["m1"] & ran_here["m2"]
    for machine in ("m1", "m2"):  # each writes every trial of the study, and links best/ only if it ran it
        found = results(tmp_path / machine / "search")
        assert sorted(r["trial"] for r in found["trials"]) == sorted(t.number for t in finished)
        assert (found["best_folder"] == "best") == (found["best"]["trial"] in ran_here[machine])
