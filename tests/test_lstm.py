"""The LSTM encoder-decoder baseline: its step-by-step decoding is its full forward, it is a model
folder like any other, and it learns through the same Trainer and CLI as the Transformer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread, token_cache  # noqa: F401
from test_seq2seq import TINY, run_cli, sentences, write_lines

from lmforge.config import ModelConfig
from lmforge.model import build_model
from lmforge.model.lstm import LSTMSeq2Seq
from lmforge.model_folder import load_model, save_model
from lmforge.tokenize import Tokenizer


def lstm_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"arch": "lstm", "vocab_size": 50, "n_layer": 2, "n_decoder_layer": 2, "n_embd": 32,
                          "block_size": 32, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 1,
                          **overrides})


def batch():
    torch.manual_seed(1)
    source = torch.randint(2, 50, (3, 7))
    mask = torch.ones_like(source)
    mask[1, 5:] = 0  # a padded row
    mask[2, 3:] = 0
    return source.masked_fill(mask == 0, 0), mask, torch.randint(2, 50, (3, 6))


def test_build_model_picks_the_lstm_and_it_round_trips_through_a_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(lstm_config()).eval()
    assert isinstance(model, LSTMSeq2Seq) and model.head.proj.weight is model.token_embedding.weight
    tokenizer = Tokenizer.train("char", ["abcdefghijklmnopqrstuvwxyz"])
    save_model(model, tmp_path / "m", tokenizer)
    loaded, _ = load_model(tmp_path / "m")
    source, mask, target = batch()
    assert torch.equal(model(source, mask, decoder_input_ids=target).logits,
                       loaded(source, mask, decoder_input_ids=target).logits)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["arch"] == "lstm"


def test_cached_steps_equal_the_full_forward_and_padding_is_invisible():
    torch.manual_seed(0)
    model = build_model(lstm_config()).eval()
    source, mask, target = batch()
    with torch.no_grad():
        full = model(source, mask, decoder_input_ids=target).logits
        memory, cache = model.encode(source, mask), model.new_cache(3, 6)
        steps = [model(None, mask, decoder_input_ids=target[:, t:t + 1], cache=cache, encoder_output=memory,
                       last_only=True).logits[:, -1] for t in range(6)]
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
        # row 2 alone, unpadded, gives the same logits as inside the padded batch
        alone = model(source[2:, :3], None, decoder_input_ids=target[2:]).logits
        torch.testing.assert_close(alone[0], full[2], atol=1e-5, rtol=1e-5)
        # reorder keeps the chosen rows' state, as beam search needs
        cache.reorder(torch.tensor([2, 2, 0]))
        after = model(None, mask[[2, 2, 0]], decoder_input_ids=target[[2, 2, 0], :1], cache=cache,
                      encoder_output=memory[[2, 2, 0]]).logits
        torch.testing.assert_close(after[0], after[1])


def test_labels_give_the_cross_entropy_and_a_bad_call_is_one_error():
    model = build_model(lstm_config())
    source, mask, target = batch()
    out = model(source, mask, decoder_input_ids=target, labels=target)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten())
    torch.testing.assert_close(out.loss, expected)
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="use lmforge translate or summarize"):
        model(source, mask)


def test_lstm_trains_and_translates_through_the_cli(tmp_path, capsys):
    write_lines(tmp_path / "train.txt", sentences(1100, 0))
    write_lines(tmp_path / "val.txt", sentences(40, 1))
    code, out, err = run_cli(capsys, "pretrain", "--arch", "lstm", "--source-file", tmp_path / "train.txt",
                             "--target-file", tmp_path / "train.txt", "--val-source-file", tmp_path / "val.txt",
                             "--val-target-file", tmp_path / "val.txt", *TINY, "--lr", "1e-2", "--max-steps", "300",
                             "--eval-every", "300", "--label-smoothing", "0", "--out", tmp_path / "run")
    assert code == 0, err
    assert "model: lstm" in out
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(v["bleu"] for v in vals if v.get("split") == "val") > 25  # it copies, imperfectly after 300 steps
    code, out, _ = run_cli(capsys, "translate", tmp_path / "run", "--input", tmp_path / "val.txt")
    assert code == 0 and len(out.splitlines()) == 40
    code, out, err = run_cli(capsys, "eval", tmp_path / "run", "--task", "translate", "--src", tmp_path / "val.txt",
                             "--ref", tmp_path / "val.txt", "--json")
    assert code == 0, err
    assert json.loads(out)["bleu"] > 25
