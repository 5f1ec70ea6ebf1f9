"""GenerationConfig(compile=True): the same tokens as eager decoding, and a clean fallback to
eager decoding (one warning) when torch.compile fails. The real compilation takes ~20 s of
CPU, so that test is marked slow (make test-all runs it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)

import lmforge.generate as generate
from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.model import LanguageModel


@pytest.fixture
def fresh_compile(monkeypatch):
    """Every test starts without a compiled step and leaves none behind."""
    monkeypatch.setattr(generate, "_compiled", None)


def make_model(**overrides) -> LanguageModel:
    kw = dict(vocab_size=60, block_size=64, n_layer=2, n_head=2, n_embd=32, init_std=0.2, tie_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**kw)).eval()


def tokens(model, prompts, compile: bool) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=12, temperature=0, compile=compile)
    return [step for step, _ in decode_steps(model, prompts, config)]


def test_failed_compilation_warns_once_and_decodes_eagerly(fresh_compile, monkeypatch):
    attempts = []

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            attempts.append(1)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    with pytest.warns(UserWarning, match="No working C\\+\\+ compiler") as caught:
        fallback = tokens(model, prompts, compile=True)
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert fallback == tokens(model, prompts, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: compilation is not tried again
        assert tokens(model, prompts, compile=True) == fallback
    assert len(attempts) == 1


def test_errors_that_are_not_compilation_still_raise(fresh_compile, monkeypatch):
    def compiled_that_touches_the_cache(fn, **kwargs):
        def compiled(model, tokens, mask, cache, *rest):
            fn(model, tokens, mask, cache, *rest)  # the cache grows: the failure came after real work
            raise ValueError("boom")
        return compiled

    monkeypatch.setattr(torch, "compile", compiled_that_touches_the_cache)
    with pytest.raises(ValueError, match="boom"):
        tokens(make_model(), [[1, 2, 3]], compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_compiled_decoding_equals_eager(fresh_compile, position):
    model = make_model(position=position)
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [7, 8, 9, 10, 11]]):  # no padding, then a padded batch
        assert tokens(model, prompts, compile=True) == tokens(model, prompts, compile=False)


def test_cli_generate_compile_uses_the_compiled_step(fresh_compile, monkeypatch, tmp_path, capsys):
    """`lmforge generate --compile` decodes through torch.compile (here a stand-in that records
    its calls, so the test stays fast) and prints what eager decoding prints."""
    from lmforge.cli import main
    from lmforge.model_folder import save_model
    from lmforge.tokenize import Tokenizer

    calls = []

    def recording_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(kwargs)
            return fn(*args)
        return compiled

    tokenizer = Tokenizer.train("char", ["hello world, the quick brown fox"])
    save_model(make_model(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id), tmp_path / "model", tokenizer)
    args = ["generate", str(tmp_path / "model"), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert not calls
    monkeypatch.setattr(torch, "compile", recording_compile)
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert len(calls) == 11 and calls[0] == {"dynamic": True}  # every step after the prompt's
