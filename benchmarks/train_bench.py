"""Character-level tiny-Shakespeare training: lmforge against Hugging Face GPT-2, same run.

nanoGPT's CPU "baby GPT" settings: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps,
lr 1e-3 (warm-up 100, cosine to 1e-4), AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0,
no dropout. Both models start from the same weights and see the same batches; their steps are
interleaved (A B A B ...) so machine noise hits both alike. Each runs the way its users run it:
lmforge through its Trainer, transformers' GPT2LMHeadModel with torch AdamW as its Trainer's
default ("adamw_torch"). Peak memory is measured separately, one short subprocess per model,
because two models in one process share one peak.

    python benchmarks/train_bench.py [--steps 2000] [--json-out FILE]

Prints one JSON object. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SETTINGS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4,
                warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0)


def build(steps: int, cache_dir: str, position: str = "learned", with_hf: bool = True):
    """lmforge Trainer (+ HF model with copied weights + an identical batch stream for HF).

    position "learned" is GPT-2's layout, the one HF can be compared with; "rope" is lmforge's
    default, trained on the same batches to show what the better default buys."""
    os.environ["LMFORGE_CACHE_DIR"] = cache_dir
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.data.collate import WindowSampler
    from lmforge.data.store import build_token_stores
    from lmforge.model import LanguageModel
    from lmforge.tokenize import Tokenizer
    from lmforge.train.trainer import Trainer

    text = DATA.read_text(encoding="utf-8")
    tokenizer = Tokenizer.train("char", [text])
    train_store, val_store = build_token_stores([text], tokenizer, val_fraction=0.1)
    s = SETTINGS
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=s["n_layer"], n_head=s["n_head"],
                         n_embd=s["n_embd"], block_size=s["block_size"], activation="gelu", position=position,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    train_config = TrainConfig(batch_size=s["batch_size"], lr=s["lr"], min_lr=s["min_lr"],
                               warmup_steps=s["warmup_steps"], max_steps=steps, beta2=s["beta2"],
                               weight_decay=s["weight_decay"], grad_clip=s["grad_clip"], progress=False,
                               eval_every=10**9, save_every=10**9)
    torch.manual_seed(1337)
    model = LanguageModel(config)
    trainer = Trainer(model, train_config, train_store, val_store, tempfile.mkdtemp(), tokenizer)
    hf = hf_copy(model) if with_hf else None  # importing transformers alone costs ~200 MB
    hf_sampler = WindowSampler(train_store, s["block_size"], s["batch_size"], train_config.seed)
    return trainer, hf, hf_sampler, val_store


def hf_copy(model):
    """GPT2LMHeadModel of the same shape holding the same weights (Conv1D stores W transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                    activation_function="gelu"))  # exact GELU, as nanoGPT and lmforge use
    sd = model.state_dict()
    mapped = {"transformer.wte.weight": sd["token_embedding.weight"],
              "transformer.wpe.weight": sd["decoder_embed.positions.weight"],
              "transformer.ln_f.weight": sd["decoder.final_norm.weight"],
              "transformer.ln_f.bias": sd["decoder.final_norm.bias"]}
    for i in range(c.n_layer):
        ours, theirs = f"decoder.blocks.{i}.", f"transformer.h.{i}."
        for a, b in [("attn_norm", "ln_1"), ("ffn_norm", "ln_2")]:
            for kind in ("weight", "bias"):
                mapped[f"{theirs}{b}.{kind}"] = sd[f"{ours}{a}.{kind}"]
        for a, b in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
                     ("ffn.down", "mlp.c_proj")]:
            mapped[theirs + b + ".weight"] = sd[ours + a + ".weight"].t().contiguous()
            mapped[theirs + b + ".bias"] = sd[ours + a + ".bias"]
    hf.load_state_dict(mapped, strict=False)
    hf.tie_weights()
    return hf.train()


def hf_optimizer(hf):
    decay = [p for n, p in hf.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    rest = [p for n, p in hf.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": SETTINGS["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=SETTINGS["lr"], betas=(0.9, SETTINGS["beta2"]))


def hf_step(hf, optimizer, sampler, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = sampler.next_batch()
    logits = hf(input_ids=x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), SETTINGS["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def val_loss(forward, store, block: int) -> float:
    """Exact loss over every validation token (non-overlapping windows)."""
    from lmforge.data.collate import eval_windows

    total, count = 0.0, 0
    for x, y in eval_windows(store, block, 64):
        logits = forward(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    return total / count


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(steps: int, eval_every: int, target: float) -> dict:
    """Three contestants, one step each in turn: lmforge (GPT-2 layout), transformers (same
    weights), lmforge with its default rotary positions. Validation curves are measured outside
    the timed steps."""
    from lmforge.train.trainer import lr_at

    with tempfile.TemporaryDirectory() as cache:
        trainer, hf, hf_sampler, val_store = build(steps, cache)
        rope_trainer = build(steps, cache, position="rope", with_hf=False)[0]
        optimizer = hf_optimizer(hf)
        steppers = {
            "lmforge": trainer.train_step,
            "hf": lambda: hf_step(hf, optimizer, hf_sampler, lr_at(len(times["hf"]), trainer.config)),
            "lmforge_rope": rope_trainer.train_step,
        }
        forwards = {"lmforge": lambda x: trainer.model(x).logits, "hf": lambda x: hf(input_ids=x).logits,
                    "lmforge_rope": lambda x: rope_trainer.model(x).logits}
        modules = {"lmforge": trainer.model, "hf": hf, "lmforge_rope": rope_trainer.model}
        times: dict[str, list[float]] = {name: [] for name in steppers}
        curves: dict[str, list[dict]] = {name: [] for name in steppers}
        started = time.perf_counter()
        for step in range(1, steps + 1):
            for name, train_step in steppers.items():
                tick = time.perf_counter()
                train_step()
                times[name].append(time.perf_counter() - tick)
            if step % eval_every == 0 or step == steps:
                for name in steppers:
                    modules[name].eval()
                    loss = val_loss(forwards[name], val_store, SETTINGS["block_size"])
                    modules[name].train()
                    curves[name].append({"step": step, "train_seconds": sum(times[name]), "val_loss": loss})
        wall = time.perf_counter() - started
    tokens = SETTINGS["batch_size"] * SETTINGS["block_size"]
    result: dict = {}
    for name in steppers:
        warm = times[name][10:] or times[name]
        ms = summary([t * 1000 for t in warm])
        reached = next((point for point in curves[name] if point["val_loss"] <= target), None)
        result[name] = {"ms_per_step": ms, "tokens_per_s": tokens / (ms["median"] / 1000),
                        "train_seconds": sum(times[name]), "final_val_loss": curves[name][-1]["val_loss"],
                        "val_curve": curves[name],
                        f"seconds_to_val_{target}": reached["train_seconds"] if reached else None}
    result["speedup_tokens_per_s"] = result["lmforge"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    result["interleaved_wall_seconds"] = wall
    return result


def peak_memory(which: str, steps: int) -> None:
    """Child process: train `which` alone for a few steps and print its peak RSS in MB."""
    with tempfile.TemporaryDirectory() as cache:
        trainer, hf, hf_sampler, _ = build(steps, cache, with_hf=which == "hf")
        if which == "lmforge":
            for _ in range(steps):
                trainer.train_step()
        else:
            optimizer = hf_optimizer(hf)
            trainer.model = None
            for _ in range(steps):
                hf_step(hf, optimizer, hf_sampler, SETTINGS["lr"])
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork+exec into ru_maxrss.
    status = Path("/proc/self/status").read_text()
    print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250, help="validation curve spacing (untimed)")
    parser.add_argument("--target", type=float, default=1.88, help="time-to-quality threshold")
    parser.add_argument("--json-out")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory(args.memory_child, args.memory_steps)
        return
    if not DATA.is_file():
        sys.exit(f"benchmark data not found: {DATA}")
    import transformers

    result = {
        "benchmark": "tinyshakespeare char-level training, lmforge vs transformers GPT2LMHeadModel",
        "command": f"python benchmarks/train_bench.py --steps {args.steps}",
        "settings": {**SETTINGS, "steps": args.steps, "dropout": 0.0, "split": "first 90% train, last 10% val"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "optimizers": {"lmforge": "AdamW fused (lmforge default)", "hf": "AdamW foreach (HF Trainer default)"},
        "contestants": {"lmforge": "lmforge, GPT-2 layout (learned positions), same weights as hf",
                        "hf": "transformers GPT2LMHeadModel", "lmforge_rope": "lmforge default: rotary positions"},
    }
    result.update(interleaved(args.steps, args.eval_every, args.target))
    for name in ("lmforge", "hf"):
        out = subprocess.run([sys.executable, __file__, "--_memory-child", name, "--memory-steps",
                              str(args.memory_steps)], capture_output=True, text=True, check=True)
        result[name]["peak_rss_mb"] = float(out.stdout.strip().splitlines()[-1])
    result["target_final_val_loss"] = 1.89
    result["meets_final_val_loss_target"] = {
        name: result[name]["final_val_loss"] <= 1.89 for name in ("lmforge", "hf", "lmforge_rope")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
