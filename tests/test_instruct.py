"""`lmforge finetune --task instruct` and `generate --chat`: conversations become text through the
folder's chat template, only the assistant's tokens are learned, and a tuned model answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, one_thread, read_metrics, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.finetune import instruct
from lmforge.finetune.run import prepare_task_run
from lmforge.finetune.tabular import Row
from lmforge.model import LanguageModel
from lmforge.model_folder import read_task, save_model
from lmforge.tokenize import Tokenizer

PAIRS = [("colour of the sky", "blue"), ("colour of grass", "green"), ("colour of snow", "white"),
         ("colour of coal", "black")]


@pytest.fixture()
def char_tokenizer() -> Tokenizer:
    return Tokenizer.train("char", ["".join(p + r for p, r in PAIRS) + "### User: Assistant:\n be brief"])


@pytest.fixture()
def decoder_folder(tmp_path, char_tokenizer) -> Path:
    config = ModelConfig(vocab_size=char_tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=64,
                         pad_token_id=char_tokenizer.pad_id, eos_token_id=char_tokenizer.eos_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "base", char_tokenizer)
    return tmp_path / "base"


def targets_text(example: instruct.Example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != instruct.IGNORE], skip_special_tokens=False)


def test_only_the_assistant_tokens_are_targets(char_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "colour of snow"},
                {"role": "assistant", "content": "white"}, {"role": "user", "content": "colour of coal"},
                {"role": "assistant", "content": "black"}]
    example = instruct.encode_conversation(messages, char_tokenizer, instruct.DEFAULT_CHAT_TEMPLATE, 200)
    assert targets_text(example, char_tokenizer) == "white<|endoftext|>black<|endoftext|>"
    text = instruct.render(instruct.DEFAULT_CHAT_TEMPLATE, messages, char_tokenizer)
    assert text == ("be brief\n\n### User:\ncolour of snow\n\n### Assistant:\nwhite<|endoftext|>\n\n"
                    "### User:\ncolour of coal\n\n### Assistant:\nblack<|endoftext|>")
    ids = char_tokenizer.encode(text)
    assert example.input_ids == ids[:-1]  # labels are aligned: labels[t] is the token after input t
    for t, label in enumerate(example.labels):
        assert label in (instruct.IGNORE, ids[t + 1])


def test_a_prompt_response_row_is_a_one_turn_conversation_and_bad_rows_say_why(char_tokenizer):
    rows = [Row(1, {"prompt": "colour of grass", "response": "green"}),
            Row(2, {"prompt": "colour of grass"}),
            Row(3, {"messages": [{"role": "user", "content": "hi"}]}),
            Row(4, {"messages": [{"role": "robot", "content": "hi"}]}),
            Row(5, {"prompt": "x" * 80, "response": "white"})]
    examples, skipped = instruct.build_examples(rows, char_tokenizer, instruct.DEFAULT_CHAT_TEMPLATE, 60, "d.jsonl")
    assert len(examples) == 1 and targets_text(examples[0], char_tokenizer) == "green<|endoftext|>"
    assert skipped.reasons == {"no prompt and response (nor messages)": [2], "no assistant message to learn": [3],
                               "a role other than system, user, assistant": [4],
                               "no answer token within the model's block": [5]}


def write_pairs(path: Path, repeat: int) -> Path:
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] * repeat
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_an_instruction_tuned_decoder_answers_through_generate_chat(tmp_path, decoder_folder, capsys):
    data = write_pairs(tmp_path / "train.jsonl", 16)
    run = prepare_task_run(dict(task="instruct", init=str(decoder_folder), data=[str(data)], val_data=[str(data)],
                                out=str(tmp_path / "chat"), batch_size=8, lr=1e-2, warmup_steps=5, max_steps=120,
                                eval_every=60, save_every=120, progress=False, bf16=False, seed=1))
    before = run.trainer.evaluate()["loss"]
    summary = run.trainer.fit()
    assert summary["val"]["loss"] < 0.1 * before, (before, summary["val"])
    assert read_task(tmp_path / "chat")["chat_template"] == instruct.DEFAULT_CHAT_TEMPLATE
    assert [r["step"] for r in read_metrics(tmp_path / "chat", "val")] == [60, 120]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "chat"), "--chat", "--prompt", "colour of snow", "--prompt",
                 "colour of coal", "--temperature", "0", "--max-new-tokens", "12", "--json"]) == 0
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in replies] == ["white", "black"]  # the answer, then the end-of-text token
    assert [r["prompt"] for r in replies] == ["colour of snow", "colour of coal"]
    assert main(["eval", str(tmp_path / "chat"), "--data", str(data), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)  # the same answers, the same loss
    assert scored["tokens"] == summary["val"]["tokens"]


def test_a_chat_template_file_is_used_and_kept(tmp_path, decoder_folder):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}"
                        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    data = write_pairs(tmp_path / "train.jsonl", 4)
    prepare_task_run(dict(task="instruct", init=str(decoder_folder), data=[str(data)], chat_template=str(template),
                          out=str(tmp_path / "chat"), max_steps=1, progress=False, bf16=False, batch_size=4))
    kept = read_task(tmp_path / "chat")["chat_template"]
    assert kept == template.read_text()
    tokenizer = Tokenizer.load(tmp_path / "chat" / "tokenizer.json")
    assert instruct.chat_prompts(tmp_path / "chat", tokenizer, ["hi"]) == ["<user>hi<assistant>"]


@pytest.mark.parametrize("argv,message", [
    (["--chat-template", "missing.jinja"], "chat template file not found: missing.jinja"),
    (["--augment", "swap"], "--augment applies to --task classify"),
])
def test_bad_instruct_options_are_one_line_and_exit_2(tmp_path, decoder_folder, capsys, argv, message):
    data = write_pairs(tmp_path / "train.jsonl", 4)
    code = main(["finetune", "--model", str(decoder_folder), "--task", "instruct", "--data", str(data),
                 "--no-progress", "--out", str(tmp_path / "chat"), *argv])
    assert code == 2 and one_line_error(capsys.readouterr().err).endswith(message)


def test_a_broken_template_is_one_line(tmp_path, decoder_folder, capsys):
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m.content }")
    data = write_pairs(tmp_path / "train.jsonl", 4)
    code = main(["finetune", "--model", str(decoder_folder), "--task", "instruct", "--data", str(data),
                 "--chat-template", str(template), "--no-progress", "--out", str(tmp_path / "chat")])
    assert code == 2 and "the chat template does not render:" in one_line_error(capsys.readouterr().err)
