"""Prompt tuning: n trained vectors read before every input of a frozen model.

The core's exactness test: a soft prompt equal to the embeddings of n real tokens must compute
exactly what those tokens, written before the input, compute (forward and greedy generation, with
and without padding). Then the run: only the prompt (and a task head) trains, the folder holds
only them, and predict / generate use them.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread, read_metrics, token_cache  # noqa: F401  (autouse)
from safetensors.torch import load_file
from test_classify import base_folder, task_options  # noqa: F401  (base_folder is a fixture)

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.finetune import classify
from lmforge.finetune.predict import classify_texts
from lmforge.finetune.prompt_tuning import add_soft_prompt
from lmforge.finetune.run import prepare_task_run
from lmforge.generate import GenerationConfig, decode_steps
from lmforge.model import build_model
from lmforge.model_folder import load_model, read_task

PREFIX = [7, 8, 9, 10]


def prompted(arch: str, position: str):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32, position=position,
                         type_vocab_size=2 if arch == "encoder" else 0)
    model = build_model(config).eval()
    add_soft_prompt(model, len(PREFIX))
    with torch.no_grad():
        model.soft_prompt.copy_(model.token_embedding.weight[PREFIX])
    return model


@pytest.mark.parametrize("arch,position", [("decoder", "rope"), ("decoder", "learned"), ("encoder", "learned"),
                                           ("encoder", "rope")])
def test_a_soft_prompt_computes_what_the_same_tokens_written_first_compute(arch, position):
    model = prompted(arch, position)
    ids = torch.randint(11, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if arch == "decoder":
        mask[0, :2] = 0  # left padding
    else:
        mask[0, -2:] = 0  # right padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        model.soft_prompt = None
        written = torch.cat([torch.tensor(PREFIX).expand(3, -1), ids], dim=1)
        if arch == "decoder":  # the padding stays in front of everything, prefix included
            written[0] = torch.cat([ids[0, :2], torch.tensor(PREFIX), ids[0, 2:]])
        full_mask = torch.cat([torch.ones(3, len(PREFIX), dtype=torch.long), mask], dim=1)
        if arch == "decoder":
            full_mask[0] = torch.tensor([0, 0] + [1] * (len(PREFIX) + 4))
        reference = model(written, attention_mask=full_mask).logits[:, len(PREFIX):]
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], reference[keep], atol=1e-5, rtol=0)


def test_greedy_generation_with_a_soft_prompt_equals_the_written_prefix():
    model = prompted("decoder", "rope")
    prompts = [[20, 21, 22], [30, 31, 32, 33, 34]]
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    ours = [step for step, _ in decode_steps(model, prompts, config)]
    model.soft_prompt = None
    reference = [step for step, _ in decode_steps(model, [PREFIX + p for p in prompts], config)]
    assert ours == reference and len(ours) == 8


def test_a_prompt_tuned_classifier_trains_only_its_prompt_and_head(tmp_path, base_folder):  # noqa: F811
    options = task_options(tmp_path, base_folder, max_steps=60, eval_every=60, save_every=60, prompt_tuning=4)
    run = prepare_task_run(options)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    first = run.trainer.evaluate()
    summary = run.trainer.fit()
    assert summary["val"]["loss"] < first["loss"]
    changed = {k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])}
    assert "soft_prompt" in changed and changed <= {"soft_prompt"} | {k for k in before if k.startswith("head.")}
    out = tmp_path / "ft"
    stored = load_file(out / "adapter.safetensors")
    assert stored["soft_prompt"].shape == (4, 32) and all(k == "soft_prompt" or k.startswith("head.") for k in stored)
    assert json.loads((out / "adapter.json").read_text())["prompt_tokens"] == 4
    model, tokenizer = load_model(out)
    torch.testing.assert_close(model.soft_prompt, run.model.soft_prompt)
    texts = ["a keyword here", "nothing at all"]
    task = read_task(out)
    loaded = classify_texts(model, tokenizer, task, texts)
    trained = classify_texts(run.model.eval(), tokenizer, task, texts)
    assert loaded == trained
    model.soft_prompt = None  # the prompt matters: without it the same weights answer otherwise
    assert classify_texts(model, tokenizer, task, texts) != loaded


def test_a_prompt_tuned_language_model_generates_and_refuses_to_merge(tmp_path, capsys):
    from helpers import tiny_options

    from lmforge.train.pretrain import prepare_run

    prepare_run(tiny_options(tmp_path, out="base", max_steps=5)).trainer.fit()
    corpus = tmp_path / "corpus.txt"
    argv = ["finetune", "--model", str(tmp_path / "base"), "--data", str(corpus), "--out", str(tmp_path / "pt"),
            "--prompt-tuning", "3", "--max-steps", "5", "--no-progress", "--no-bf16", "--batch-size", "4"]
    assert main(argv) == 0
    assert "trainable: 96 of" in capsys.readouterr().out  # 3 vectors of 32
    assert main(["generate", str(tmp_path / "pt"), "--prompt", "The", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["merge-lora", str(tmp_path / "pt"), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "soft prompt" in err and "cannot be merged" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_bad_prompt_length_is_one_line_and_exit_2(tmp_path, base_folder, capsys, value):  # noqa: F811
    options = task_options(tmp_path, base_folder)
    argv = ["finetune", "--task", "classify", "--model", str(base_folder), "--data", options["data"][0],
            "--out", str(tmp_path / "x"), "--prompt-tuning", value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--prompt-tuning must be a whole number of virtual tokens" in err and err.count("\n") == 1


# ---------------------------------------------------------------- what the tests above let through


def test_segment_ids_of_an_encoder_input_are_shifted_past_the_soft_prompt():
    model = prompted("encoder", "learned")
    ids = torch.randint(11, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        ours = model(ids, token_type_ids=types).logits
        model.soft_prompt = None
        written = torch.cat([torch.tensor(PREFIX).expand(2, -1), ids], dim=1)
        written_types = torch.cat([torch.zeros(2, len(PREFIX), dtype=torch.long), types], dim=1)  # prompt: 0
        reference = model(written, token_type_ids=written_types).logits[:, len(PREFIX):]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_a_prompt_longer_than_the_window_keeps_room_for_the_soft_prompt():
    """Learned positions end at block_size: the soft prompt's vectors take their share of the
    window, so a long prompt keeps fewer of its own tokens (what the written prefix keeps)."""
    model = prompted("decoder", "learned")
    assert model.max_input_tokens == 32 - len(PREFIX)
    long = [11 + k % 39 for k in range(40)]
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    ours = [step for step, _ in decode_steps(model, [long, [20, 21, 22]], config)]
    model.soft_prompt = None
    reference = [step for step, _ in decode_steps(model, [PREFIX + long[-20:], PREFIX + [20, 21, 22]], config)]
    assert ours == reference and len(ours) == 8


def test_the_soft_prompt_starts_as_vocabulary_rows_and_leaves_room_for_a_token():
    torch.manual_seed(0)
    config = ModelConfig(arch="decoder", vocab_size=50, n_layer=1, n_head=2, n_embd=32, block_size=8)
    model = add_soft_prompt(build_model(config), 7)  # one position left for the input
    table = model.token_embedding.weight
    assert model.soft_prompt.requires_grad and model.soft_prompt.shape == (7, 32)
    assert all(any(torch.equal(row, vocab_row) for vocab_row in table) for row in model.soft_prompt)
    assert model.soft_prompt.data_ptr() != table.data_ptr()  # a copy: training the prompt leaves the table alone
    with pytest.raises(LmforgeError, match="already has a soft prompt"):
        add_soft_prompt(model, 2)
    with pytest.raises(LmforgeError, match="--prompt-tuning 8 leaves no room for input in a block of 8"):
        add_soft_prompt(build_model(config), 8)


def test_a_prompt_tuning_run_takes_its_own_defaults_and_records_its_length(tmp_path, base_folder):  # noqa: F811
    run = prepare_task_run(task_options(tmp_path, base_folder, prompt_tuning=4, lr=None, max_steps=1))
    assert (run.trainer.config.lr, run.trainer.config.min_lr, run.trainer.config.weight_decay) == (3e-2, 3e-3, 0.0)
    both = prepare_task_run(task_options(tmp_path, base_folder, out="both", prompt_tuning=4, lora_rank=2, max_steps=1))
    assert both.model.lora.prompt_tokens == 4 and both.model.lora.rank == 2 and both.model.prompt_length == 4
    assert json.loads((tmp_path / "both" / "run.json").read_text())["lora"]["prompt_tokens"] == 4
    trainable = {n for n, p in both.model.named_parameters() if p.requires_grad}
    assert "soft_prompt" in trainable and any(".lora_A." in n for n in trainable)
    assert not any(n.startswith("token_embedding") or ".attn.qkv.weight" in n for n in trainable)


def test_a_prompt_tuning_run_resumes_exactly_and_keeps_its_length(tmp_path, base_folder):  # noqa: F811
    options = task_options(tmp_path, base_folder, out="whole", prompt_tuning=3, max_steps=12, eval_every=6,
                           save_every=6, log_every=1, dropout=0.1)
    whole = prepare_task_run(options).trainer
    whole.fit()
    prepare_task_run({**options, "out": str(tmp_path / "split")}).trainer.fit(until=6)
    resumed = prepare_task_run({"task": "classify", "out": str(tmp_path / "split"), "resume": True})
    assert resumed.resumed and resumed.trainer.step == 6 and resumed.model.prompt_length == 3
    resumed.trainer.fit()
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / name, "train")] for name in ("split", "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    torch.testing.assert_close(resumed.model.soft_prompt, whole.model.soft_prompt, atol=0, rtol=0)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(LmforgeError) as error:
        prepare_task_run({"task": "classify", "out": str(tmp_path / "split"), "resume": True, "prompt_tuning": 5})
    assert str(error.value) == (f"{tmp_path / 'split'} trains a 3-vector soft prompt; "
                                "--prompt-tuning cannot change on --resume")


def test_a_prompt_tuned_language_model_trains_on_windows_that_leave_the_prompt_room(tmp_path):
    from helpers import tiny_options

    from lmforge.train.pretrain import prepare_run

    prepare_run(tiny_options(tmp_path, out="base", max_steps=2, position="learned")).trainer.fit()
    options = dict(init=str(tmp_path / "base"), data=[str(tmp_path / "corpus.txt")], out=str(tmp_path / "pt"),
                   prompt_tuning=3, max_steps=3, progress=False, bf16=False, batch_size=4)
    run = prepare_run(options)
    assert run.trainer.seq_len == 16 - 3 and run.model.max_input_tokens == 13
    run.trainer.fit()  # learned positions: a window of 16 more the prompt would not fit
    with pytest.raises(LmforgeError, match="seq_len 16 is longer than the model's block_size 16 less its 3-vector"):
        prepare_run({**options, "out": str(tmp_path / "pt2"), "seq_len": 16})


def test_a_prompt_tuned_classifier_cuts_long_texts_to_leave_the_prompt_room(tmp_path, base_folder):  # noqa: F811
    run = prepare_task_run(task_options(tmp_path, base_folder, prompt_tuning=4, max_steps=1))
    model, task = run.model.eval(), run.trainer.task
    long = "a keyword here and then a good deal more text " * 4  # ~190 characters, a block of 48
    [scores] = classify_texts(model, run.tokenizer, task, [long])
    assert sum(s["score"] for s in scores) == pytest.approx(1.0)
    with torch.no_grad():
        ids, types = classify.encode(run.tokenizer, [long], None, 44, "encoder", task["template"])[0]
        alone = torch.softmax(model(torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0], -1)
    assert len(ids) == 44 and scores[0]["score"] == pytest.approx(float(alone.max()), abs=1e-6)
