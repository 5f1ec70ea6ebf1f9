"""Shared pieces of the server tests: one tiny trained model per test process, and a live
server (uvicorn in a thread, on a free port of 127.0.0.1) for any settings.

Imported by test_serve*.py and test_playground.py; it holds no tests itself.
"""

from __future__ import annotations

import functools
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from helpers import tiny_options

MODEL_OPTIONS = dict(n_layer=2, n_embd=48, n_head=4, block_size=64, seq_len=32, batch_size=8, lr=1e-2,
                     max_steps=150)


@functools.cache
def trained_model_dir() -> Path:
    """A 2-layer char-level decoder trained for 150 steps on repetitive English (~4 s on one
    thread): it continues "The quick" with " brown fox", so greedy outputs are real text."""
    from lmforge.train.pretrain import prepare_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = Path(tempfile.mkdtemp(prefix="lmforge-serve-"))
        run = prepare_run(tiny_options(root, **MODEL_OPTIONS))
        run.trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@functools.cache
def loaded():
    """(model, tokenizer) of trained_model_dir(), fp32, eval mode."""
    from lmforge.model_folder import load_model

    return load_model(trained_model_dir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model=None, tokenizer=None, **settings):
    """Yield the base URL of a running server; it stops (and its engine with it) on exit."""
    import uvicorn

    from lmforge.serve.app import ServeSettings, create_app

    if model is None:
        model, tokenizer = loaded()
    settings.setdefault("name", "tiny")
    app = create_app(model, tokenizer, ServeSettings(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    app.state.server.http = server  # tests stop it as a SIGTERM would (should_exit)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(15)


def greedy_reference(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """What `lmforge generate --temperature 0` prints for one prompt."""
    from lmforge.generate import GenerationConfig, generate

    return generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=max_tokens, temperature=0))
