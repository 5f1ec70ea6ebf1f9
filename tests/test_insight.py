"""Attention maps, the logit lens and training plots (lmforge/insight, the attention/lens/plot verbs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_helpers import bpe_tokenizer, tiny_folder, tiny_model
from helpers import tiny_options, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.insight.attention import attention_maps, logit_lens, recording
from lmforge.insight.plots import plot_runs, read_records
from lmforge.train.pretrain import prepare_run

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.mark.parametrize("overrides", [
    dict(), dict(position="alibi"), dict(position="relative", relative_distance=8), dict(position="rope", n_kv_head=1),
    dict(position="rope", n_head=4, n_kv_head=2),
])
def test_recorded_attention_is_the_attention_used(tokenizer, overrides):
    """The plain-softmax path computes the same outputs as the fast paths; its rows are distributions."""
    model = tiny_model(tokenizer, **overrides)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        fast = model(ids).logits
        with recording(model) as modules:
            recorded = model(ids).logits
            probs = [m.record[0] for m in modules]
    assert all(m.record is None for m in modules)  # switched off again
    torch.testing.assert_close(recorded, fast, rtol=1e-4, atol=1e-5)
    for p in probs:
        assert p.shape == (1, model.config.n_head, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        assert torch.all(p.triu(1) == 0)  # causal: nothing from the future


def test_maps_for_every_family(tokenizer, tmp_path, capsys):
    for arch, expected in (("decoder", ["decoder layer 1 self-attention", "decoder layer 2 self-attention"]),
                           ("encoder", ["encoder layer 1 self-attention", "encoder layer 2 self-attention"]),
                           ("encoder-decoder", ["encoder layer 1 self-attention", "encoder layer 2 self-attention",
                                                "decoder layer 1 self-attention", "decoder layer 1 cross-attention",
                                                "decoder layer 2 self-attention", "decoder layer 2 cross-attention"])):
        model = tiny_model(tokenizer, arch)
        maps = attention_maps(model, tokenizer, TEXT, target="a dog" if arch == "encoder-decoder" else None)
        assert [m.name for m in maps] == expected
        n_source = len(tokenizer.encode(TEXT))
        for m in maps:
            assert m.probs.shape[0] == 2 and np.allclose(m.probs.sum(-1), 1.0, atol=1e-5)
            assert (len(m.queries), len(m.keys)) == m.probs.shape[1:]
            if "cross" in m.name:  # decoder tokens (start + "a dog") look at the source's tokens
                assert m.probs.shape[1:] == (1 + len(tokenizer.encode("a dog")), n_source)
        if arch == "encoder":  # bidirectional: the future is seen
            assert maps[0].probs[:, 0, -1].min() > 0
        folder = tiny_folder(tmp_path / arch, arch)
        assert main(["attention", str(folder), "--text", TEXT, "--out", str(tmp_path / f"{arch}-maps")]) == 0
        written = capsys.readouterr().out.split()
        assert len(written) == len(expected)
        assert all(open(path, "rb").read(8) == PNG for path in written)


def test_logit_lens_last_layer_is_the_models_prediction(tokenizer, tmp_path, capsys):
    model = tiny_model(tokenizer)
    lens = logit_lens(model, tokenizer, TEXT, top_k=3)
    ids = tokenizer.encode(TEXT)
    assert len(lens["layers"]) == 2 and len(lens["tokens"]) == len(ids)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0], -1)
    last = lens["layers"][-1]["positions"]
    for position, top in enumerate(last):
        expected = probs[position].topk(3)
        assert [t["id"] for t in top] == expected.indices.tolist()
        assert [t["prob"] for t in top] == pytest.approx(expected.values.tolist(), abs=1e-5)
    first = lens["layers"][0]["positions"][0][0]["prob"]
    assert first != pytest.approx(last[0][0]["prob"])  # an earlier layer predicts something else

    folder = tiny_folder(tmp_path / "model")
    assert main(["lens", str(folder), "--text", TEXT, "--out", str(tmp_path / "lens"), "--top-k", "2"]) == 0
    saved = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert all(len(pos) == 2 for layer in saved["layers"] for pos in layer["positions"])
    assert (tmp_path / "lens" / "lens.png").read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, lr in (("slow", 1e-3), ("fast", 3e-3)):
        options = tiny_options(root, out=name, lr=lr, max_steps=12, eval_every=4, log_every=2, eval_batches=2)
        prepare_run(options).trainer.fit()
        runs.append(root / name)
    return runs


def test_plots_overlay_runs(two_runs, tmp_path, capsys):
    result = plot_runs(two_runs, tmp_path / "plots")
    assert result["panels"] == ["loss", "validation perplexity", "learning rate", "tokens per second",
                                "gradient norm"]
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(["loss.png", "perplexity.png", "lr.png", "tokens_per_s.png", "grad_norm.png",
                            "overview.png"])
    for path in result["files"]:
        data = path.read_bytes()
        assert data[:8] == PNG and data[12:16] == b"IHDR"
    records = read_records(two_runs[0])
    assert {"elapsed_s", "tokens_per_s", "grad_norm", "lr"} <= set(next(r for r in records if r["split"] == "train"))
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_a_plot_line_per_run(two_runs, monkeypatch, tmp_path):
    from lmforge.insight import plots

    drawn = []
    real = plots._draw
    monkeypatch.setattr(plots, "_draw", lambda ax, title, lines, runs: (real(ax, title, lines, runs),
                                                                         drawn.append((title, ax.get_legend()))))
    plots.plot_runs(two_runs, tmp_path / "p")
    loss = next(legend for title, legend in drawn if title == "loss")
    assert sorted(t.get_text() for t in loss.get_texts()) == ["fast train", "fast val", "slow train", "slow val"]
