"""LoRA (finetune/lora.py): new adapters change nothing, only they (and a task's head) train and
are saved, a LoRA run resumes exactly, merge-lora and PEFT's format compute what the adapter
folder does, and mistakes are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401  (token_cache and one_thread are autouse fixtures)
    assert_same_weights,
    one_line_error,
    one_thread,
    read_metrics,
    snapshot,
    token_cache,
    write_corpus,
)

from lmforge import __version__
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.finetune import lora
from lmforge.finetune.lora import TARGETS, LoraSpec
from lmforge.finetune.run import prepare_task_run
from lmforge.model import LanguageModel, build_model
from lmforge.model.linear import Linear
from lmforge.model_folder import convert_to_hf, load_model, merge_adapter, save_model
from lmforge.tokenize import Tokenizer
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.pretrain import prepare_run

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n" * 40
GPT2_LAYOUT = dict(position="learned", activation="gelu", norm="layernorm", bias=True)  # what GPT-2 expresses
BERT_LAYOUT = dict(GPT2_LAYOUT, arch="encoder", norm_position="post", embedding_norm=True, type_vocab_size=2)
BART_LAYOUT = dict(GPT2_LAYOUT, arch="encoder-decoder", norm_position="post", embedding_norm=True)
TASK = {"task": "classify", "labels": ["a", "b", "c"], "template": "lmforge"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train("char", [TEXT])


def save_base(folder: Path, tokenizer: Tokenizer, seed: int = 0, **layout) -> Path:
    """A random model folder: what a LoRA run starts from."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16, block_size=32,
                         init_std=0.2, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                         mask_token_id=tokenizer.mask_id, **(layout or GPT2_LAYOUT))
    torch.manual_seed(seed)
    save_model(LanguageModel(config), folder, tokenizer)
    return folder


def make_adapter(base: Path, out: Path, spec: LoraSpec, task: dict | None = None) -> Path:
    """An adapter folder as a run writes one, with random (non-zero) adapters and head."""
    start, tokenizer = load_model(base)
    n_labels = len(task["labels"]) if task else None
    model = build_model(ModelConfig.from_dict({**start.config.to_dict(), "n_labels": n_labels}))
    model.load_state_dict({k: v for k, v in start.state_dict().items() if not (task and k.startswith("head."))},
                          strict=False)
    lora.start_adapters(model, spec, str(base))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.3)
    save_model(model, out, tokenizer, task=task)
    return out


def ids(vocab: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.arch == "encoder-decoder":
            return model(tokens, decoder_input_ids=tokens[:, :5]).logits
        return model(tokens).logits


def adapter_names(model) -> set[str]:
    return {k for k in model.state_dict() if lora.is_adapter_weight(k, model.config)}


# =========================================================================== the layers


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_new_adapters_change_nothing_and_only_they_get_gradients(arch):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(arch=arch, vocab_size=40, n_layer=1, n_head=4, n_kv_head=2, n_embd=16,
                                      block_size=16))
    tokens = ids(40)
    before = logits(model, tokens)
    lora.apply_lora(model, LoraSpec(2, 4.0, TARGETS))
    assert torch.equal(logits(model, tokens), before)  # B = 0: exactly the base's logits
    adapted = {k.rsplit(".lora_A.", 1)[0] + "/" + k.rsplit(".", 1)[1] for k in adapter_names(model) if "lora_A" in k}
    prefix = "decoder.blocks.0."
    expected = {f"{prefix}attn.qkv/{t}" for t in "qkv"} | {f"{prefix}attn.proj/o", f"{prefix}ffn.up/ffn",
                                                           f"{prefix}ffn.down/ffn"}
    if arch == "encoder-decoder":  # cross-attention too: q alone, k and v from the fused kv
        expected |= {f"{prefix}cross_attn.q/q", f"{prefix}cross_attn.kv/k", f"{prefix}cross_attn.kv/v",
                     f"{prefix}cross_attn.proj/o"}
    assert expected <= adapted
    out = model(tokens, decoder_input_ids=tokens[:, :5]) if arch == "encoder-decoder" else model(tokens)
    out.logits.square().mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == adapter_names(model)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_B." in n)


def test_each_slice_gets_its_own_update_scaled_by_alpha_over_rank():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=16))
    lora.apply_lora(model, LoraSpec(2, 6.0, ("q", "k")))  # alpha / rank = 3
    layer = model.decoder.blocks[0].attn.qkv
    for b in layer.lora_B.values():
        torch.nn.init.normal_(b)
    x = torch.randn(3, 16)
    delta = layer(x) - Linear.forward(layer, x)  # the base layer's own computation
    for name, (start, stop) in {"q": (0, 16), "k": (16, 32)}.items():
        a, b = layer.lora_A[name], layer.lora_B[name]
        torch.testing.assert_close(delta[:, start:stop], 3.0 * x @ a.T @ b.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight()[start:stop], 3.0 * b @ a)
    assert torch.equal(delta[:, 32:], torch.zeros(3, 16))  # v untouched


# =========================================================================== runs and folders


def test_a_lora_task_run_trains_and_saves_only_the_adapters_and_head(tmp_path, tokenizer, capsys):
    base = save_base(tmp_path / "base", tokenizer, **BERT_LAYOUT)
    rows = [("the quick brown fox", "a"), ("a stitch in time", "b"), ("the lazy dog", "c")] * 20
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["finetune", "--task", "classify", "--model", str(base), "--data", str(data), "--out", str(out),
            "--lora-rank", "2", "--lora-targets", "v,q,ffn", "--batch-size", "8", "--lr", "0.01", "--warmup-steps",
            "0", "--max-steps", "4", "--save-every", "4", "--eval-every", "100", "--seed", "3", "--no-progress",
            "--no-bf16"]
    run = prepare_task_run({"task": "classify", "init": str(base), "data": [str(data)], "out": str(tmp_path / "lib"),
                            "lora_rank": 2, "lora_targets": "v,q,ffn", "batch_size": 8, "lr": 0.01,
                            "warmup_steps": 0, "max_steps": 4, "save_every": 4, "eval_every": 100, "seed": 3,
                            "progress": False, "bf16": False})
    trainable = adapter_names(run.model)
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == trainable
    optimized = {id(p) for group in run.trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in run.model.parameters() if p.requires_grad}
    before = snapshot(run.model)
    run.trainer.fit()
    changed = {k for k, v in snapshot(run.model).items() if not torch.equal(v, before[k])}
    assert changed == trainable  # every adapter matrix and the head moved; nothing else did

    assert main(argv) == 0
    printed = capsys.readouterr().out
    parameters = sum(p.numel() for p in run.model.parameters())
    adapters = sum(run.model.get_parameter(k).numel() for k in trainable)
    assert f"trainable: {adapters:,} of {parameters / 1e3:.1f}k parameters ({adapters / parameters:.1%})" in printed
    files = {p.name for p in out.iterdir()}
    assert {"adapter.json", "adapter.safetensors", "config.json", "tokenizer.json", "task.json"} <= files
    assert "model.safetensors" not in files
    assert {p.name for p in checkpoint_dirs(out)[-1].iterdir()} == {
        "adapter.json", "adapter.safetensors", "config.json", "tokenizer.json", "task.json", "trainer_state.pt"}
    record = json.loads((out / "adapter.json").read_text())
    assert (record["base"], record["rank"], record["alpha"], record["targets"], record["lmforge_version"]) == (
        os.path.abspath(base), 2, 4.0, ["q", "v", "ffn"], __version__)
    from safetensors import safe_open

    with safe_open(out / "adapter.safetensors", "pt") as stored:
        assert set(stored.keys()) == trainable
    assert (out / "adapter.safetensors").stat().st_size < adapters * 4 + 4096  # the tensors and a header, no more
    loaded, _ = load_model(out)
    torch.testing.assert_close(logits(loaded, ids(tokenizer.vocab_size)), logits(run.model.eval(),
                                                                                ids(tokenizer.vocab_size)))


def test_a_lora_run_resumes_exactly(tmp_path, tokenizer):
    base = save_base(tmp_path / "base", tokenizer)
    options = dict(init=str(base), data=[str(write_corpus(tmp_path, TEXT))], batch_size=4, lr=1e-2, warmup_steps=0,
                   max_steps=8, save_every=4, eval_every=100, log_every=1, seed=3, dropout=0.1, progress=False,
                   bf16=False, lora_rank=2, lora_targets="q,k,v,o,ffn")
    whole = prepare_run({**options, "out": str(tmp_path / "whole")})
    whole.trainer.fit()
    prepare_run({**options, "out": str(tmp_path / "cut")}).trainer.fit(until=4)
    resumed = prepare_run({"out": str(tmp_path / "cut"), "resume": True})
    assert resumed.resumed and resumed.trainer.step == 4 and resumed.model.lora.same_shape(whole.model.lora)
    resumed.trainer.fit()
    losses = [[(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name, "train")]
              for name in ("cut", "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert_same_weights(snapshot(resumed.model), snapshot(whole.model))
    with pytest.raises(LmforgeError) as error:
        prepare_run({"out": str(tmp_path / "cut"), "resume": True, "lora_rank": 4})
    assert str(error.value) == (f"{tmp_path / 'cut'} trains LoRA rank 2, alpha 4 on q,k,v,o,ffn; "
                                "LoRA options cannot change on --resume")


CASES = {"decoder q,v": ({}, ("q", "v"), None), "decoder all": ({}, TARGETS, None),
         "encoder classifier": (BERT_LAYOUT, TARGETS, TASK), "encoder-decoder all": (BART_LAYOUT, TARGETS, None)}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_computes_what_the_adapter_folder_does(tmp_path, tokenizer, case):
    layout, targets, task = CASES[case]
    base = save_base(tmp_path / "base", tokenizer, **layout)
    adapter = make_adapter(base, tmp_path / "adapter", LoraSpec(3, 5.0, targets), task)
    assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    adapted, _ = load_model(adapter)
    assert getattr(merged, "lora", None) is None and (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "task.json").is_file() == (task is not None)
    tokens = ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits(merged, tokens), logits(adapted, tokens), atol=1e-5, rtol=0)
    if task is None:  # (a classifier's head is new: nothing to compare with)
        assert (logits(adapted, tokens) - logits(load_model(base)[0], tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_export_and_computes_the_same_logits(tmp_path, tokenizer, case):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    layout, targets, task = CASES[case]
    base = save_base(tmp_path / "base", tokenizer, **layout)
    adapter = make_adapter(base, tmp_path / "adapter", LoraSpec(3, 5.0, targets), task)
    convert_to_hf(adapter, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    if case == "decoder q,v":  # q and v of GPT-2's fused c_attn: one rank-6 LoRA, alpha scaled alike
        assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 6
        assert config["alpha_pattern"]["transformer.h.0.attn.c_attn"] == 10.0
    auto = (transformers.AutoModelForSequenceClassification if task else transformers.AutoModelForSeq2SeqLM
            if layout.get("arch") == "encoder-decoder" else transformers.AutoModelForCausalLM)
    base_only = shutil.copytree(tmp_path / "hf", tmp_path / "hf-base", ignore=shutil.ignore_patterns("adapter_*"))
    with_peft = peft.PeftModel.from_pretrained(auto.from_pretrained(base_only), tmp_path / "hf")
    # with peft installed, transformers itself applies an adapter that sits beside the model
    with_transformers = auto.from_pretrained(tmp_path / "hf")
    assert with_transformers.peft_config and not hasattr(auto.from_pretrained(base_only), "peft_config")
    adapted, _ = load_model(adapter)
    tokens = ids(tokenizer.vocab_size)
    decoder_ids = {"decoder_input_ids": tokens[:, :5]} if layout.get("arch") == "encoder-decoder" else {}
    for hf in (with_peft, with_transformers):
        with torch.no_grad():
            theirs = hf.eval()(input_ids=tokens, **decoder_ids).logits
        torch.testing.assert_close(theirs, logits(adapted, tokens), atol=1e-5, rtol=0)


# =========================================================================== mistakes


@pytest.mark.parametrize("flags, message", [
    ({"lora_rank": 0}, "--lora-rank must be a whole number of at least 1; got 0"),
    ({"lora_rank": 4, "lora_alpha": -1.0}, "--lora-alpha must be a positive number; got -1.0"),
    ({"lora_rank": 4, "lora_targets": "q,gate"}, "--lora-targets: unknown target 'gate' (choose from q,k,v,o,ffn)"),
    ({"lora_rank": 4, "lora_targets": ","}, "--lora-targets is empty (choose from q,k,v,o,ffn)"),
    ({"lora_alpha": 16.0}, "--lora-alpha needs --lora-rank (the adapters' rank; e.g. 8)"),
    ({"lora_alpha": 16.0, "lora_targets": "q"}, "--lora-alpha and --lora-targets need --lora-rank (the adapters' "
                                                "rank; e.g. 8)"),
])
def test_bad_lora_options_are_one_line_errors(tmp_path, flags, message, capsys):
    with pytest.raises(LmforgeError) as error:
        prepare_run({"init": str(tmp_path), "out": str(tmp_path / "run"), **flags})
    assert str(error.value) == message
    argv = ["finetune", "--model", str(tmp_path), "--data", "x.txt", "--out", str(tmp_path / "run")]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    assert main(argv) == 2
    assert one_line_error(capsys.readouterr().err) == f"lmforge finetune: error: {message}"


def test_a_missing_or_changed_base_and_other_misuse_are_one_line_errors(tmp_path, tokenizer):
    base = save_base(tmp_path / "base", tokenizer)
    adapter = make_adapter(base, tmp_path / "adapter", LoraSpec(2, 4.0, ("q", "v")))
    save_base(base, tokenizer, seed=5)  # the same shapes, other weights
    with pytest.raises(LmforgeError, match="^the base model .*/base changed since the adapter was trained on it "
                                           r"\(its weights differ\); restore that base, or train the adapter again$"):
        load_model(adapter)
    shutil.rmtree(base)
    with pytest.raises(LmforgeError, match=r"^the adapter's base model folder .*/base is missing \(the adapter only "
                                           r"holds what it trained; restore that folder\)$"):
        load_model(adapter)
    plain = save_base(tmp_path / "plain", tokenizer)
    with pytest.raises(LmforgeError) as error:
        merge_adapter(plain, tmp_path / "merged")
    assert str(error.value) == f"{plain} is not a LoRA adapter folder (it has no adapter.json)"
    with pytest.raises(LmforgeError) as error:
        prepare_run({"init": str(adapter), "data": ["x"], "out": str(tmp_path / "run"), "lora_rank": 2})
    assert str(error.value) == (f"{adapter} is a LoRA adapter folder; merge it into a model first "
                                f"(lmforge merge-lora {adapter} --out DIR) and start from that")
    with pytest.raises(LmforgeError) as error:
        prepare_run({"data": ["x"], "out": str(tmp_path / "run"), "lora_rank": 2})
    assert str(error.value) == "LoRA adapts a trained model: lmforge finetune --model FOLDER --lora-rank R"
