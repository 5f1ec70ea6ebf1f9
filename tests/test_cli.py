"""The command line, called in-process through `lmforge.cli.main` (fast), plus a couple of real
subprocesses for exit codes: tokenizer train, pretrain (+ resume, config files), generate, eval,
demo, --help, and one-line errors with exit code 2 for everything a user can get wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (  # noqa: F401  (fixtures are registered by import)
    ENGLISH,
    PYTHON_SOURCE,
    one_line_error,
    one_thread,
    read_metrics,
    token_cache,
    write_corpus,
)

from lmforge import demo
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model_folder import load_model
from lmforge.tokenize import Tokenizer
from lmforge.train.checkpoint import checkpoint_dirs

REPO = Path(__file__).resolve().parents[1]
TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "4", "--warmup-steps", "2", "--no-progress"]


def pretrain_args(data: Path, out: Path, *extra: str, max_steps: int = 20) -> list[str]:
    return ["pretrain", "--data", str(data), *TINY, "--max-steps", str(max_steps), "--eval-every", "10",
            "--save-every", "10", "--out", str(out), *extra]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_error(capsys, *argv: str, contains: str | tuple[str, ...]) -> str:
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    line = one_line_error(err)
    for word in (contains,) if isinstance(contains, str) else contains:
        assert word in line, line
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run shared by the generate/eval tests (read-only for them)."""
    root = tmp_path_factory.mktemp("cli-run")
    corpus = write_corpus(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE_DIR", str(root / "cache"))
        code = main(pretrain_args(corpus, root / "run"))
    assert code == 0
    return root / "run"


# --------------------------------------------------------------------------- tokenizer train


@pytest.mark.parametrize(("kind", "vocab"), [("char", None), ("bpe", "300")])
def test_tokenizer_train(tmp_path, capsys, kind, vocab):
    corpus = write_corpus(tmp_path / "data", ENGLISH)
    write_corpus(tmp_path / "data", PYTHON_SOURCE, "code.py")
    out = tmp_path / "tok" / "tokenizer.json"
    argv = ["tokenizer", "train", "--data", str(tmp_path / "data"), "--kind", kind, "--out", str(out)]
    code, stdout, _ = run_cli(capsys, *argv, *(["--vocab-size", vocab] if vocab else []))
    assert code == 0
    tokenizer = Tokenizer.load(out)
    assert tokenizer.kind == kind
    assert f"{kind} tokenizer, {tokenizer.vocab_size} tokens" in stdout and "2 files" in stdout
    if vocab:
        assert tokenizer.vocab_size == int(vocab)
    text = corpus.read_text()[:200]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_id is not None and tokenizer.mask_id is not None


# --------------------------------------------------------------------------- pretrain, generate, eval


def test_pretrain_writes_a_model_folder(trained):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "train_config.json",
                 "run.json"):
        assert (trained / name).is_file(), name
    assert [p.name for p in checkpoint_dirs(trained)] == ["step-00000010", "step-00000020"]
    assert (trained / "checkpoints" / "step-00000020" / "trainer_state.pt").is_file()
    train, val = read_metrics(trained, "train"), read_metrics(trained, "val")
    assert [r["step"] for r in train] == [10, 20] and [r["step"] for r in val] == [10, 20]
    assert all(math.isfinite(r["loss"]) for r in train + val)
    config = json.loads((trained / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["block_size"]) == (1, 2, 32, 32)
    assert json.loads((trained / "train_config.json").read_text())["max_steps"] == 20
    model, tokenizer = load_model(trained)
    assert tokenizer.kind == "char" and model.config.vocab_size == tokenizer.vocab_size


def test_pretrain_prints_a_summary(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    code, out, _ = run_cli(capsys, *pretrain_args(corpus, tmp_path / "run", max_steps=10))
    assert code == 0
    assert "corpus: 1 files, 1 documents" in out
    assert "tokenizer: char" in out and "model: decoder" in out
    assert "done: step 10, val loss" in out and str(tmp_path / "run") in out


def test_generate_greedy_is_deterministic(trained, capsys):
    argv = ["generate", str(trained), "--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "12"]
    code, first, _ = run_cli(capsys, *argv)
    assert code == 0
    assert first.startswith("The quick") and len(first.rstrip("\n")) >= len("The quick")
    assert run_cli(capsys, *argv)[1] == first


def test_generate_multiple_prompts_json(trained, capsys):
    code, out, _ = run_cli(capsys, "generate", str(trained), "--prompt", "The", "--prompt", "A stitch",
                           "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["The", "A stitch"]
    assert all(set(r) == {"prompt", "completion"} and isinstance(r["completion"], str) for r in records)
    # each completion is what that prompt alone gives
    single = run_cli(capsys, "generate", str(trained), "--prompt", "A stitch", "--temperature", "0",
                     "--max-new-tokens", "8", "--json")[1]
    assert json.loads(single) == records[1]


def test_generate_stream_prints_the_same_text(trained, capsys):
    base = ["generate", str(trained), "--prompt", "The dog", "--temperature", "0", "--max-new-tokens", "12"]
    plain = run_cli(capsys, *base)[1]
    code, streamed, _ = run_cli(capsys, *base, "--stream")
    assert code == 0 and streamed == plain
    code, two, _ = run_cli(capsys, *base, "--prompt", "A", "--stream")
    assert code == 0 and two.startswith(plain) and "-" * 40 in two


def test_generate_seeded_sampling(trained, capsys):
    argv = ["generate", str(trained), "--prompt", "The", "--max-new-tokens", "20", "--temperature", "1.0",
            "--top-k", "10", "--top-p", "0.95", "--repetition-penalty", "1.1"]
    a = run_cli(capsys, *argv, "--seed", "1")
    b = run_cli(capsys, *argv, "--seed", "1")
    c = run_cli(capsys, *argv, "--seed", "2")
    assert a[0] == b[0] == c[0] == 0
    assert a[1] == b[1] and a[1] != c[1]


def test_generate_stop_string(trained, capsys):
    base = ["generate", str(trained), "--prompt", "The", "--temperature", "0", "--max-new-tokens", "20", "--json"]
    full = json.loads(run_cli(capsys, *base)[1])["completion"]
    assert len(full) >= 6
    stop = full[3:5]
    cut = json.loads(run_cli(capsys, *base, "--stop", stop)[1])["completion"]
    assert cut == full[: full.find(stop)]


def test_eval_json(trained, tmp_path, capsys):
    text = ENGLISH[:3000]
    data = write_corpus(tmp_path, text, "held_out.txt")
    code, out, _ = run_cli(capsys, "eval", str(trained), "--data", str(data), "--json")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens"}
    tokenizer = Tokenizer.load(trained / "tokenizer.json")
    assert result["tokens"] == len(tokenizer.encode(text))  # + eos, - the first token
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / len(text.encode("utf-8")), rel=1e-6
    )
    assert 0 < result["loss"] < math.log(tokenizer.vocab_size)  # trained: better than uniform
    code, human, _ = run_cli(capsys, "eval", str(trained), "--data", str(data))
    assert code == 0 and "perplexity" in human and "bits/byte" in human


def test_pretrain_resume_with_more_steps(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, _ = run_cli(capsys, "pretrain", "--resume", "--out", str(run), "--max-steps", "30", "--no-progress")
    assert code == 0, out
    assert "resuming at step 20" in out and "done: step 30" in out
    assert checkpoint_dirs(run)[-1].name == "step-00000030"
    assert [r["step"] for r in read_metrics(run, "train")] == [10, 20, 30]
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 30
    # resuming a finished run is a no-op, not an error
    code, out, _ = run_cli(capsys, "pretrain", "--resume", "--out", str(run), "--no-progress")
    assert code == 0 and "resuming at step 30" in out


@pytest.mark.parametrize("change", [["--n-embd", "64"], ["--position", "learned"]], ids=["n-embd", "position"])
def test_resume_with_a_different_model_is_refused(trained, tmp_path, capsys, change):
    """The checkpoint's weights cannot fill a model of another shape (n_embd) or another layout
    (rope swapped for a learned position table): a one-line error, not a traceback nor a silent
    partial load."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    expect_error(capsys, "pretrain", "--resume", "--out", str(run), "--max-steps", "30", *change,
                 contains="lmforge pretrain: error:")
    assert checkpoint_dirs(run)[-1].name == "step-00000020"


def test_resume_from_another_working_directory(tmp_path, capsys, monkeypatch):
    """`--resume` needs nothing but the run folder, even when the run was started with a relative
    --data path from some other directory."""
    project = tmp_path / "project"
    write_corpus(project)
    monkeypatch.chdir(project)
    code, _, err = run_cli(capsys, "pretrain", "--data", "corpus.txt", *TINY, "--max-steps", "4", "--out", "run")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "pretrain", "--resume", "--out", str(project / "run"), "--max-steps", "6")
    assert code == 0, err
    assert "resuming at step 4" in out
    assert checkpoint_dirs(project / "run")[-1].name == "step-00000006"


def test_pretrain_with_a_trained_tokenizer_and_val_data(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    held_out = write_corpus(tmp_path, ENGLISH[:2000], "val.txt")
    tok_file = tmp_path / "tok.json"
    assert run_cli(capsys, "tokenizer", "train", "--data", str(corpus), "--kind", "bpe", "--vocab-size", "300",
                   "--out", str(tok_file))[0] == 0
    args = pretrain_args(corpus, tmp_path / "run", "--val-data", str(held_out), max_steps=4)
    args[args.index("--tokenizer") + 1] = str(tok_file)
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    tokenizer = Tokenizer.load(tok_file)
    assert (tmp_path / "run" / "tokenizer.json").read_text() == tokenizer.to_json()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 300
    val_tokens = len(tokenizer.encode(ENGLISH[:2000])) + 1  # + the document's eos
    assert f"/ {val_tokens:,} val tokens" in out
    assert "tokenizer: bpe, 300 tokens" in out


# --------------------------------------------------------------------------- config files


def test_yaml_config_file_and_flag_override(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    config = tmp_path / "model.yaml"
    config.write_text(
        "n_layer: 1\nn-embd: 48\nn_head: 2\nblock-size: 16\nbatch_size: 4\nmax_steps: 4\n"
        "tokenizer: char\nprogress: false\nposition: rope\n"
    )
    code, _, err = run_cli(capsys, "pretrain", "--config", str(config), "--data", str(corpus),
                           "--n-embd", "32", "--out", str(tmp_path / "run"))
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["n_embd"] == 32  # the flag wins
    assert (saved["n_layer"], saved["n_head"], saved["block_size"], saved["position"]) == (1, 2, 16, "rope")
    train = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (train["batch_size"], train["max_steps"]) == (4, 4)


def test_json_config_file_with_data_and_out(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "data": [str(corpus)], "out": str(tmp_path / "run"), "tokenizer": "char", "n_layer": 2, "n_head": 2,
        "n_embd": 32, "block_size": 16, "batch_size": 2, "max-steps": 3, "lr": 0.01, "progress": False,
    }))
    code, _, err = run_cli(capsys, "pretrain", "--config", str(config), "--n-layer", "1")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["n_layer"] == 1 and saved["block_size"] == 16
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lr"] == 0.01


def test_config_file_errors(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    unknown = tmp_path / "bad.yaml"
    unknown.write_text("n_layer: 1\nn_layers: 2\n")
    expect_error(capsys, "pretrain", "--config", str(unknown), "--data", str(corpus), "--out", str(tmp_path / "r"),
                 contains=("unknown", "n_layers"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    expect_error(capsys, "pretrain", "--config", str(broken), "--data", str(corpus), "--out", str(tmp_path / "r"),
                 contains="cannot parse")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    expect_error(capsys, "pretrain", "--config", str(listy), "--out", str(tmp_path / "r"), contains="mapping")
    expect_error(capsys, "pretrain", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"),
                 contains="not found")


# --------------------------------------------------------------------------- bad input: exit 2, one line


def test_pretrain_bad_data(tmp_path, capsys):
    out = str(tmp_path / "run")
    expect_error(capsys, "pretrain", "--data", str(tmp_path / "nope.txt"), "--out", out,
                 contains=("no such file or folder", "nope.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    expect_error(capsys, "pretrain", "--data", str(empty), "--out", out, contains=("no usable text", "empty"))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\x00\x01\x02" * 100)
    (binary / "y.dat").write_bytes(bytes(range(256)))
    expect_error(capsys, "pretrain", "--data", str(binary), "--out", out, contains=("no usable text", "binary"))
    short = write_corpus(tmp_path, "Just a few words.\n", "short.txt")
    expect_error(capsys, "pretrain", "--data", str(short), *TINY, "--out", out,
                 contains="fewer than one context window")
    expect_error(capsys, "pretrain", "--data", str(tmp_path / "*.missing"), "--out", out, contains="matched no files")
    expect_error(capsys, "pretrain", "--out", out, contains="--data")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pretrain_bad_options(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = str(tmp_path / "run")
    expect_error(capsys, "pretrain", "--data", str(corpus), *TINY, "--n-head", "3", "--out", out,
                 contains=("n_embd (32)", "n_head (3)"))
    expect_error(capsys, "pretrain", "--data", str(corpus), *TINY, "--lr", "-1", "--out", out, contains="lr")
    expect_error(capsys, "pretrain", "--data", str(corpus), *TINY, "--max-steps", "0", "--out", out,
                 contains="max_steps")
    expect_error(capsys, "pretrain", "--data", str(corpus), "--tokenizer", str(tmp_path / "nope.json"),
                 "--out", out, contains="no such tokenizer")
    expect_error(capsys, "pretrain", "--data", str(corpus), "--n-layer", "two", "--out", out,
                 contains=("--n-layer", "invalid int value"))
    expect_error(capsys, "pretrain", "--data", str(corpus), "--arch", "gpt", "--out", out, contains="invalid choice")


def test_pretrain_refuses_an_existing_run(trained, capsys):
    expect_error(capsys, *pretrain_args(trained.parent / "corpus.txt", trained), contains=("already holds", "--resume"))


def test_generate_and_eval_bad_input(trained, tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    expect_error(capsys, "generate", missing, "--prompt", "x", "--max-new-tokens", "4",
                 contains=("model folder not found", "no-model"))
    expect_error(capsys, "eval", missing, "--data", str(write_corpus(tmp_path)), contains="model folder not found")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(trained / "config.json", half / "config.json")
    expect_error(capsys, "generate", str(half), "--prompt", "x", contains=("not a model folder", "missing"))
    expect_error(capsys, "generate", str(trained), "--prompt", "x", "--temperature", "-1", contains="temperature")
    expect_error(capsys, "generate", str(trained), "--prompt", "x", "--top-p", "2", contains="top_p")
    expect_error(capsys, "generate", str(trained), "--prompt", "x", "--max-new-tokens", "0",
                 contains="max_new_tokens")
    expect_error(capsys, "eval", str(trained), "--data", str(tmp_path / "nope.txt"), contains="no such file")
    expect_error(capsys, "generate", str(trained), contains="--prompt")
    expect_error(capsys, "tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--kind", "bpe",
                 "--out", str(tmp_path / "t.json"), contains="no such file")
    expect_error(capsys, "tokenizer", "train", "--data", str(write_corpus(tmp_path)), "--kind", "bpe",
                 "--vocab-size", "100", "--out", str(tmp_path / "t.json"), contains="too small")


def test_errors_in_a_real_process():
    env = {**os.environ, "LMFORGE_CACHE_DIR": "/nonexistent-lmforge-cache"}
    for argv in (["generate", "/nonexistent/model", "--prompt", "hi"], ["pretrain", "--n-layer", "x"]):
        proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        line = one_line_error(proc.stderr)
        assert line.startswith("lmforge ")
        assert proc.stdout == ""


# --------------------------------------------------------------------------- --help


HELP_FLAGS = {
    ("pretrain",): ["--data", "--val-data", "--config", "--tokenizer", "--arch", "--n-layer", "--n-head", "--n-embd",
                    "--block-size", "--batch-size", "--grad-accum", "--lr", "--max-steps", "--eval-every",
                    "--save-every", "--seed", "--compile", "--no-compile", "--resume", "--out"],
    ("generate",): ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                    "--stop", "--seed", "--stream"],
    ("eval",): ["--data", "--json"],
    ("demo",): ["--minutes", "--out"],
    ("tokenizer", "train"): ["--data", "--kind", "--vocab-size", "--out"],
}


@pytest.mark.parametrize("verb", list(HELP_FLAGS), ids=" ".join)
def test_help_lists_the_contract_flags(capsys, verb):
    code, out, err = run_cli(capsys, *verb, "--help")
    assert code == 0 and err == ""
    for flag in HELP_FLAGS[verb]:
        assert f"{flag} " in out or f"{flag}," in out or f"{flag}\n" in out, flag


def test_top_level_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for verb in ("demo", "tokenizer", "pretrain", "generate", "eval"):
        assert verb in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "lmforge" in out
    code, _, err = run_cli(capsys)
    assert code == 2 and "required" in one_line_error(err)


# --------------------------------------------------------------------------- demo


def tiny_demo(monkeypatch, tmp_path) -> None:
    """The real demo pipeline on a few small files and a tiny model."""
    sources = tmp_path / "stdlib"
    sources.mkdir(exist_ok=True)
    files = []
    for i in range(8):
        path = sources / f"mod{i}.py"
        path.write_text(PYTHON_SOURCE.replace("add", f"add{i}").replace("Counter", f"Counter{i}") * 2)
        files.append(path)
    monkeypatch.setattr(demo, "stdlib_source_files", lambda: files)
    monkeypatch.setattr(demo, "DEMO_MODEL", {  # a new dict: tests may change it
        "arch": "decoder", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64, "position": "rope",
        "activation": "gelu", "tokenizer": "bpe", "vocab_size": 320,
    })
    monkeypatch.setattr(demo, "DEMO_TRAIN", {
        "batch_size": 4, "lr": 3e-3, "warmup_steps": 5, "eval_batches": 2, "save_every": 100_000,
        "max_steps": 100_000, "progress": False,
    })


def test_demo_with_a_tiny_model(tmp_path, monkeypatch, capsys):
    tiny_demo(monkeypatch, tmp_path)
    out = tmp_path / "demo"
    assert demo.run_demo(minutes=0.03, out=out) == 0
    printed = capsys.readouterr().out
    assert "8 files" in printed
    assert "held-out perplexity:" in printed
    assert printed.count("the prompt, then what the model wrote ---") == len(demo.PROMPTS)
    for prompt in demo.PROMPTS:
        assert prompt in printed
    model, tokenizer = load_model(out)
    assert tokenizer.kind == "bpe" and model.config.n_embd == 32
    assert checkpoint_dirs(out)  # the final save happened
    assert json.loads((out / "run.json").read_text())["data"] == ["<python stdlib>"]

    # the CLI verb, again over the same folder: starts over
    code, printed, err = run_cli(capsys, "demo", "--minutes", "0.03", "--out", str(out))
    assert code == 0, err
    assert "held-out perplexity:" in printed
    load_model(out)

    # never deletes a folder it did not write
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    expect_error(capsys, "demo", "--minutes", "0.03", "--out", str(other), contains="not a demo run")
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(LmforgeError, match="minutes"):
        demo.run_demo(minutes=0, out=tmp_path / "x")


def test_the_generate_command_the_demo_suggests_works(tmp_path, monkeypatch, capsys):
    """The demo ends with `try:  lmforge generate <out> ...`; for a model of the demo's block size
    that exact command must work."""
    block_size = demo.DEMO_MODEL["block_size"]
    tiny_demo(monkeypatch, tmp_path)
    demo.DEMO_MODEL["block_size"] = block_size  # (a patched copy: the real dict is restored)
    out = tmp_path / "demo"
    assert demo.run_demo(minutes=0.02, out=out) == 0
    printed = capsys.readouterr().out
    suggestion = next(line for line in printed.splitlines() if line.startswith("try:"))
    argv = shlex.split(suggestion.removeprefix("try:"))
    assert argv[:3] == ["lmforge", "generate", str(out)]
    code, text, err = run_cli(capsys, *argv[1:])
    assert code == 0, err
    assert text.startswith("def main():")


@pytest.mark.slow
def test_real_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "LMFORGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "demo", "--minutes", "0.3", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity" in proc.stdout
    assert "the prompt, then what the model wrote ---" in proc.stdout
    model, tokenizer = load_model(out)
    assert tokenizer.kind == "bpe"
    assert f"lmforge generate {out} --prompt 'def main():' --stream" in proc.stdout
    from lmforge.cli import main as cli_main

    assert cli_main(["generate", str(out), "--prompt", "def main():", "--stream"]) == 0  # the suggestion works


def test_progress_bar_shows_loss_speed_and_time_left(tmp_path, capsys):
    """The bar (stderr) carries the running loss, tokens/s and tqdm's elapsed<remaining clock;
    the falling validation perplexity is printed above it."""
    data = write_corpus(tmp_path, "the cat sat on the mat and the dog sat on the log.\n" * 80, "corpus.txt")
    args = [a for a in pretrain_args(data, tmp_path / "run", max_steps=20) if a != "--no-progress"]
    code, out, err = run_cli(capsys, *args, "--progress")
    assert code == 0, err
    bar = err.replace("\r", "\n")
    assert re.search(r"loss=\d+\.\d{3}", bar), bar[-500:]
    assert re.search(r"tok_s=[\d,]+", bar), bar[-500:]
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", bar), bar[-500:]  # elapsed<remaining
    perplexities = [float(p) for p in re.findall(r"step \d+: val loss [\d.]+, perplexity ([\d.]+)", out + err)]
    assert len(perplexities) == 2 and perplexities[1] < perplexities[0], (out, err)
