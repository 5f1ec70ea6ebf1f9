"""`lmforge serve` on the command line: bad flags and folders are one line and exit code 2, and
(slow) a real server process finishes its streams on SIGTERM, then exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import requests
from helpers import one_line_error, one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from test_serve_support import free_port, trained_model_dir

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.model import build_model
from lmforge.model_folder import save_model


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "lmforge serve: error: --max-batch must be at least 1"),
    (["--max-queue", "-1"], "lmforge serve: error: --max-queue must be 0 or more"),
    (["--timeout", "0"], "lmforge serve: error: --timeout must be positive"),
    (["--threads", "0"], "lmforge serve: error: --threads must be at least 1"),
    (["--max-tokens", "0"], "lmforge serve: error: --max-tokens must be at least 1; got 0"),
    (["--rate-limit", "0"], "lmforge serve: error: --rate-limit must be at least 1 request per minute; got 0"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    code, err = run_cli(["serve", str(trained_model_dir()), *flags], capsys)
    assert code == 2 and one_line_error(err) == message


def test_bad_folder_and_blocklist_are_one_line(tmp_path, capsys):
    code, err = run_cli(["serve", str(tmp_path / "missing")], capsys)
    assert code == 2 and one_line_error(err) == f"lmforge serve: error: model folder not found: {tmp_path / 'missing'}"
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("fine\nre:(unclosed\n")
    code, err = run_cli(["serve", str(trained_model_dir()), "--blocklist", str(blocklist)], capsys)
    assert code == 2 and one_line_error(err).startswith("lmforge serve: error: blocklist regex '(unclosed' does not")


def test_an_encoder_cannot_be_served(tmp_path, capsys):
    from lmforge.tokenize import Tokenizer

    tokenizer = Tokenizer.train("char", ["abc def"])
    config = ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                         block_size=16)
    save_model(build_model(config), tmp_path / "enc", tokenizer)
    code, err = run_cli(["serve", str(tmp_path / "enc")], capsys)
    assert code == 2
    assert one_line_error(err) == ("lmforge serve: error: serve needs a decoder model; "
                                   "this folder holds an encoder model")


@pytest.mark.slow
def test_sigterm_lets_open_streams_finish():
    """A real `lmforge serve` process: SIGTERM while one stream runs and five wait; all six end
    with [DONE] and every token, then the process ends and the port closes."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(trained_model_dir()),
                                "--port", str(port), "--max-batch", "1"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        streams = [requests.post(url + "/v1/completions", stream=True, timeout=60, json={
            "prompt": "The", "max_tokens": 60, "stream": True, "temperature": 0}) for _ in range(6)]
        lines = [s.iter_lines() for s in streams]
        next(lines[0])  # the first request is running, the other five wait in the queue
        process.send_signal(signal.SIGTERM)
        tails = [[line for line in stream if line] for stream in lines]
        assert all(tail[-1] == b"data: [DONE]" for tail in tails)
        counts = [sum(len(json.loads(x[6:])["choices"][0]["text"]) for x in tail[:-1]) for tail in tails]
        assert counts[1:] == [60] * 5 and counts[0] >= 59, counts
        # uvicorn drains, then re-raises the signal so the exit status tells it was a SIGTERM
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert "Finished server process" in process.stderr.read()
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
