"""Small shared pieces for test_train.py, test_generate.py and test_cli.py.

Import the fixtures by name (``from helpers import token_cache``) so that pytest registers them
in the importing module; ``token_cache`` is autouse there: every test gets its own
LMFORGE_CACHE_DIR, so no test reads or writes the user's token cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

# ~9 KB of very repetitive English: a 1-layer model learns a lot of it in a few dozen steps.
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun. "
    "A stitch in time saves nine. All that glitters is not gold.\n"
) * 60

PYTHON_SOURCE = '''\
def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count


for i in range(10):
    print(add(i, i))
'''


def write_corpus(folder: Path, text: str = ENGLISH, name: str = "corpus.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def tiny_options(tmp_path: Path, out: str = "run", **overrides) -> dict:
    """Flat prepare_run options for a 1-layer char-level decoder that trains in ~1 s."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(tmp_path)
    options = dict(
        data=[str(corpus)], out=str(tmp_path / out), tokenizer="char",
        n_layer=1, n_head=2, n_embd=32, block_size=16,
        batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40,
        eval_every=1000, eval_batches=4, save_every=1000, log_every=1,
        seed=7, progress=False,
        bf16=False,  # tests compare runs exactly: fp32 whatever the CPU (bf16 has tests of its own)
    )
    options.update(overrides)
    return options


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def script_validation(trainer, figures: list[float], metric: str = "loss") -> dict[int, dict]:
    """Evaluations return the scripted figures in turn; returns the weights at each evaluation's step."""
    weights_at: dict[int, dict] = {}
    queue = iter(figures)

    def evaluate(*args, **kwargs):
        weights_at[trainer.step] = snapshot(trainer.model)
        return {"loss": 0.0, "perplexity": 1.0, metric: next(queue)}

    trainer.evaluate = evaluate
    return weights_at


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs"
        else:
            diff = (a[name].float() - b[name].float()).abs().max().item()
            assert diff <= atol, f"{name} differs by up to {diff:.3g} (allowed {atol:.3g})"


def one_line_error(text: str) -> str:
    """The single non-empty line of an error output (fails if there are more)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {text!r}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch) -> Path:
    """A private token cache for every test (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("token-cache")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
