"""Training speed and quality on character-level tiny Shakespeare: lmforge against Hugging Face
GPT-2, in the same run.

Two shapes (`--config`):
  tiny  nanoGPT's CPU "baby GPT": 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps;
        Python and dispatch overhead weigh heavily at this size.
  mid   6 layers, 6 heads, 384 wide, block 256, batch 16: the matrix products dominate.
Both use lr 1e-3 (warm-up 100, cosine to 1e-4), AdamW betas (0.9, 0.99), weight decay 0.1,
clip 1.0, no dropout, exact GELU.

Contestants start from the same weights and see the same batches; their steps are interleaved
(A B C A B C ...) so machine noise hits all alike. lmforge runs through its Trainer;
transformers' GPT2LMHeadModel with torch AdamW, its Trainer's default ("adamw_torch"). Each
step's FLOPs are set against the matrix-product peak measured in the same run, so the table
also says how far from the machine's limit every contestant is. Peak memory is measured in
separate short subprocesses (two models in one process share one peak).

`--time-to-quality` instead races lmforge's recipe (`lmforge pretrain`'s defaults for a decoder:
rotary positions, ReLU, RMSNorm, no biases, lr 3e-3, a schedule sized to the target) against the
baseline recipe in transformers, until each reaches the target validation loss, and compares their
training wall times.

    python benchmarks/train_bench.py [--config tiny|mid] [--steps N] [--compile] [--readme]
    python benchmarks/train_bench.py --time-to-quality [--readme]

Prints one JSON object. Never asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, matmul_gflops, publish, report, summary  # noqa: E402

from lmforge.hardware import cpu_has_native_bf16  # noqa: E402
from lmforge.train.pretrain import RECIPE_MODEL, RECIPE_TRAIN  # noqa: E402  (pretrain's defaults race)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RECIPE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
CONFIGS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, steps=2000, eval_every=250),
    "mid": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16, steps=40, eval_every=0),
}
NAMES = {"lmforge": "lmforge (GPT-2 layout)", "hf": "transformers GPT2LMHeadModel",
         "lmforge_compiled": "lmforge (GPT-2 layout), torch.compile", "lmforge_rope": "lmforge default (RoPE)",
         "lmforge_bf16": "lmforge (GPT-2 layout), bf16 autocast", "hf_bf16": "transformers, bf16 autocast"}


class Data:
    """Char tokenizer and train/val token stores, built once per run in a throwaway cache."""

    def __init__(self, cache_dir: str):
        os.environ["LMFORGE_CACHE_DIR"] = cache_dir
        from lmforge.data.store import build_token_stores
        from lmforge.tokenize import Tokenizer

        text = DATA.read_text(encoding="utf-8")
        self.tokenizer = Tokenizer.train("char", [text])
        self.train, self.val = build_token_stores([text], self.tokenizer, val_fraction=0.1)


def make_trainer(data: Data, shape: dict, steps: int, model: dict | None = None, **recipe):
    """An lmforge Trainer for `shape`, by default in GPT-2's layout (learned positions, exact GELU:
    the one transformers can be compared with); `model` overrides ModelConfig options, `recipe`
    TrainConfig ones. Seeded, so every call starts equal."""
    from lmforge.config import ModelConfig, TrainConfig
    from lmforge.model import LanguageModel
    from lmforge.train.trainer import Trainer

    options = {"activation": "gelu", "position": "learned", **(model or {})}
    config = ModelConfig(vocab_size=data.tokenizer.vocab_size, n_layer=shape["n_layer"], n_head=shape["n_head"],
                         n_embd=shape["n_embd"], block_size=shape["block_size"], eos_token_id=data.tokenizer.eos_id,
                         pad_token_id=data.tokenizer.pad_id, **options)
    train_config = TrainConfig(batch_size=shape["batch_size"], max_steps=steps, progress=False,  # fp32 unless told
                               eval_every=10**9, save_every=10**9, **{"bf16": False, **RECIPE, **recipe})
    torch.manual_seed(1337)
    return Trainer(LanguageModel(config), train_config, data.train, data.val, tempfile.mkdtemp(), data.tokenizer)


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


class HFRunner:
    """transformers' model stepped the way its users train it, on lmforge's batch stream and
    learning-rate schedule (so both sides see identical batches and rates); with bf16, inside
    torch.autocast(bfloat16), as its Trainer's --bf16 does."""

    def __init__(self, twin, data: Data, shape: dict, train_config, bf16: bool = False):
        from lmforge.data.collate import WindowSampler

        self.model, self.config, self.step = hf_copy(twin), train_config, 0
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        decay = lambda n, p: p.dim() >= 2 and "wte" not in n and "wpe" not in n  # noqa: E731
        params = list(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in params if decay(n, p)], "weight_decay": train_config.weight_decay},
             {"params": [p for n, p in params if not decay(n, p)], "weight_decay": 0.0}],
            lr=train_config.lr, betas=(train_config.beta1, train_config.beta2))
        self.sampler = WindowSampler(data.train, shape["block_size"], shape["batch_size"], train_config.seed)

    def train_step(self) -> float:
        from lmforge.train.trainer import lr_at

        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        x, y = self.sampler.next_batch()
        with self.autocast:
            loss = F.cross_entropy(self.model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def logits(self, x):
        return self.model(input_ids=x).logits


@torch.no_grad()
def val_loss(module, logits, store, block: int) -> float:
    """Exact loss over every validation token (non-overlapping windows), outside the timed steps."""
    from lmforge.data.collate import eval_windows

    module.eval()
    total, count = 0.0, 0
    for x, y in eval_windows(store, block, 64):
        total += float(F.cross_entropy(logits(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    module.train()
    return total / count


def contest(racers: dict, steps: dict, eval_every: int, block: int, val_store, target: float | None = None) -> dict:
    """Step every racer in turn until each has done its steps (or, with a target, reached it).
    racers[name] = (train_step, module, logits). Returns per-racer step times and val curves."""
    times = {name: [] for name in racers}
    curves = {name: [] for name in racers}
    active = list(racers)
    while active:
        for name in list(active):
            train_step, module, logits = racers[name]
            tick = time.perf_counter()
            train_step()
            times[name].append(time.perf_counter() - tick)
            done = len(times[name])
            if eval_every and (done % eval_every == 0 or done == steps[name]):
                loss = val_loss(module, logits, val_store, block)
                curves[name].append({"step": done, "train_seconds": sum(times[name]), "val_loss": loss})
                if target is not None and loss <= target:
                    active.remove(name)
                    continue
            if done == steps[name]:
                active.remove(name)
    return {"times": times, "curves": curves}


def first_below(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["val_loss"] <= target), None)


def speed(args, shape: dict) -> dict:
    """The interleaved speed (and, for tiny, quality) comparison."""
    from lmforge.train.trainer import configure_optimizer

    steps = args.steps or shape["steps"]
    eval_every = shape["eval_every"] if args.eval_every is None else args.eval_every
    with tempfile.TemporaryDirectory() as cache:
        data = Data(cache)
        trainer = make_trainer(data, shape, steps)
        hf = HFRunner(trainer.model, data, shape, trainer.config)
        racers = {"lmforge": (trainer.train_step, trainer.model, lambda x: trainer.model(x).logits),
                  "hf": (hf.train_step, hf.model, hf.logits)}
        compile_seconds = None
        if args.compile:
            compiled = make_trainer(data, shape, steps, compile=True)
            initial, position = copy.deepcopy(compiled.model.state_dict()), compiled.sampler.state_dict()
            tick = time.perf_counter()
            compiled.train_step()  # compiles; then back to the start, so it races on equal terms
            compile_seconds = time.perf_counter() - tick
            compiled.model.load_state_dict(initial)
            compiled.optimizer = configure_optimizer(compiled.model, compiled.config)
            compiled.sampler.load_state_dict(position)
            compiled.step = 0
            racers["lmforge_compiled"] = (compiled.train_step, compiled.model, lambda x: compiled.model(x).logits)
        if args.rope:
            rope = make_trainer(data, shape, steps, model={"position": "rope"})
            racers["lmforge_rope"] = (rope.train_step, rope.model, lambda x: rope.model(x).logits)
        if args.bf16:  # same start, same batches, in bf16 autocast (evaluated in fp32 like the rest)
            ours_bf16 = make_trainer(data, shape, steps, bf16=True)
            hf_bf16 = HFRunner(ours_bf16.model, data, shape, ours_bf16.config, bf16=True)
            racers["lmforge_bf16"] = (ours_bf16.train_step, ours_bf16.model, lambda x: ours_bf16.model(x).logits)
            racers["hf_bf16"] = (hf_bf16.train_step, hf_bf16.model, hf_bf16.logits)
        flops_per_step = trainer.model.flops_per_token(shape["block_size"]) * shape["batch_size"] * shape["block_size"]
        peak_before = matmul_gflops()
        started = time.perf_counter()
        raced = contest(racers, dict.fromkeys(racers, steps), eval_every, shape["block_size"], data.val)
        wall = time.perf_counter() - started
        peak = max(peak_before, matmul_gflops())
    tokens = shape["batch_size"] * shape["block_size"]
    result = {"interleaved_wall_seconds": wall, "flops_per_step": flops_per_step, "matmul_peak_gflops": peak,
              "floor_ms_per_step": flops_per_step / peak / 1e6}
    for name in racers:
        warm = raced["times"][name][10:] or raced["times"][name]
        ms = summary([t * 1000 for t in warm])
        curve = raced["curves"][name]
        reached = first_below(curve, args.target) if curve else None
        result[name] = {"ms_per_step": ms, "tokens_per_s": tokens / (ms["median"] / 1000),
                        "fraction_of_matmul_peak": flops_per_step / (ms["median"] / 1000) / (peak * 1e9),
                        "train_seconds": sum(raced["times"][name]),
                        "final_val_loss": curve[-1]["val_loss"] if curve else None, "val_curve": curve,
                        f"first_step_val_le_{args.target}": reached["step"] if reached else None}
    if compile_seconds is not None:
        result["lmforge_compiled"]["compile_seconds"] = compile_seconds
    hf_rate = result["hf"]["tokens_per_s"]
    for name in racers:
        result[name]["speedup_vs_hf"] = result[name]["tokens_per_s"] / hf_rate
    result["hf_ms_over_floor"] = result["hf"]["ms_per_step"]["median"] / result["floor_ms_per_step"]
    return result


def peak_memory(which: str, config: str, steps: int) -> None:
    """Child process: train `which` alone for a few steps and print its peak RSS in MB."""
    shape = CONFIGS[config]
    with tempfile.TemporaryDirectory() as cache:
        data = Data(cache)
        runner = make_trainer(data, shape, steps)
        if which == "hf":
            runner = HFRunner(runner.model, data, shape, runner.config)  # the lmforge trainer is freed here
        for _ in range(steps):
            runner.train_step()
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork+exec into ru_maxrss.
    status = Path("/proc/self/status").read_text()
    print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024)


def speed_table(result: dict, config: str) -> str:
    racers = [name for name in NAMES if name in result]
    lines = ["| | " + " | ".join(NAMES[name] for name in racers) + " |", "|---" * (len(racers) + 1) + "|"]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(result[name]) for name in racers) + " |")

    row("ms per step, median (min–max)",
        lambda r: f"{r['ms_per_step']['median']:.1f} ({r['ms_per_step']['min']:.1f}–{r['ms_per_step']['max']:.1f})")
    row("tokens/s (median step)", lambda r: f"{r['tokens_per_s']:,.0f}")
    row("× transformers", lambda r: f"{r['speedup_vs_hf']:.2f}")
    row("% of the matrix-product peak", lambda r: f"{100 * r['fraction_of_matmul_peak']:.0f}%")
    if result["lmforge"]["val_curve"]:
        row("final validation loss (every val token)", lambda r: f"{r['final_val_loss']:.4f}")
        key = next(k for k in result["lmforge"] if k.startswith("first_step_val_le_"))
        row(f"first validation ≤ {key.rsplit('_', 1)[1]}", lambda r: f"step {r[key]}" if r[key] else "not reached")
    if "peak_rss_mb" in result["lmforge"]:
        row("peak RSS, training alone", lambda r: f"{r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else "–")
    if "lmforge_bf16" in result and result["lmforge_bf16"]["final_val_loss"]:
        fp32, bf16 = result["lmforge"]["final_val_loss"], result["lmforge_bf16"]["final_val_loss"]
        lines.append(f"\nbf16 against fp32, same seed and batches: final validation loss {bf16:.4f} against {fp32:.4f} "
                     f"({100 * (bf16 - fp32) / fp32:+.2f}%).")
    if "lmforge_compiled" in result:
        lines.append(f"\nCompiling took {result['lmforge_compiled']['compile_seconds']:.0f} s, not counted above (with "
                     "torch's on-disk compile cache empty it takes 15–50 s here).")
    lines.append(f"\nOne step is {result['flops_per_step'] / 1e9:.2f} GFLOP; at the matrix-product peak measured in "
                 f"the same run ({result['matmul_peak_gflops']:.0f} GFLOP/s, MKL's best 1024² product) the products "
                 f"alone would take {result['floor_ms_per_step']:.1f} ms. transformers takes "
                 f"{result['hf_ms_over_floor']:.2f}× that.")
    return "\n".join(lines)


def time_to_quality(args) -> dict:
    """Baseline recipe in transformers (GPT-2 layout) against lmforge's recipe, raced to the target,
    both in the precision that is fastest on this machine: bf16 autocast where the CPU has bf16
    units (what lmforge's default picks), fp32 elsewhere."""
    shape = CONFIGS["tiny"]
    bf16 = {"auto": cpu_has_native_bf16(), "bf16": True, "fp32": False}[args.precision]
    precision = "bf16 autocast" if bf16 else "fp32"
    with tempfile.TemporaryDirectory() as cache:
        data = Data(cache)
        twin = make_trainer(data, shape, args.baseline_steps)
        hf = HFRunner(twin.model, data, shape, twin.config, bf16=bf16)
        ours = make_trainer(data, shape, args.recipe_steps, model=RECIPE_MODEL, lr=args.recipe_lr,
                            min_lr=args.recipe_lr / 10, bf16=bf16)
        racers = {"baseline": (hf.train_step, hf.model, hf.logits),
                  "lmforge": (ours.train_step, ours.model, lambda x: ours.model(x).logits)}
        steps = {"baseline": args.baseline_steps, "lmforge": args.recipe_steps}
        raced = contest(racers, steps, args.ttq_eval_every, shape["block_size"], data.val, target=args.target)
    result = {"target_val_loss": args.target, "eval_every": args.ttq_eval_every}
    for name in racers:
        reached = first_below(raced["curves"][name], args.target)
        result[name] = {"schedule_steps": steps[name], "reached_at_step": reached["step"] if reached else None,
                        "train_seconds_to_target": reached["train_seconds"] if reached else None,
                        "median_ms_per_step": summary([t * 1000 for t in raced["times"][name]])["median"],
                        "val_curve": raced["curves"][name]}
    result["baseline"]["recipe"] = (f"transformers GPT2LMHeadModel (learned positions, GELU, LayerNorm, biases); "
                                    f"lr {RECIPE['lr']:g} → {RECIPE['min_lr']:g}; {precision}")
    parts = {"position": "{} positions", "activation": "{}", "norm": "{}", "bias": "biases: {}"}
    model = ", ".join(parts[k].format(v) for k, v in RECIPE_MODEL.items())
    result["lmforge"]["recipe"] = f"lmforge ({model}); lr {args.recipe_lr:g} → {args.recipe_lr / 10:g}; {precision}"
    result["precision"] = precision
    times = [result[name]["train_seconds_to_target"] for name in racers]
    result["time_ratio"] = times[1] / times[0] if all(times) else None
    return result


def ttq_table(result: dict) -> str:
    lines = ["| | model, learning rate and precision | cosine schedule | first validation ≤ "
             f"{result['target_val_loss']} | training seconds to it |", "|---|---|---:|---:|---:|"]
    for name, label in (("baseline", "baseline"), ("lmforge", "lmforge")):
        r = result[name]
        reached = f"step {r['reached_at_step']}" if r["reached_at_step"] else "not reached"
        seconds = f"{r['train_seconds_to_target']:.1f}" if r["train_seconds_to_target"] else "–"
        lines.append(f"| {label} | {r['recipe']} | {r['schedule_steps']} steps | {reached} | {seconds} |")
    if result["time_ratio"]:
        lines.append(f"\nlmforge needs {100 * result['time_ratio']:.0f}% of the baseline's training time. Both use "
                     "AdamW (0.9, 0.99), weight decay 0.1, clip 1.0, warm-up 100, batch 12 × 64, the model size "
                     "of the tiny table.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, help="steps per contestant (default: 2000 tiny, 40 mid)")
    parser.add_argument("--eval-every", type=int, help="validation curve spacing, untimed (0: none)")
    parser.add_argument("--target", type=float, default=1.88, help="validation loss of the quality target")
    parser.add_argument("--compile", action="store_true", help="add lmforge with torch.compile")
    parser.add_argument("--rope", action=argparse.BooleanOptionalAction, default=True,
                        help="add lmforge's default model (rotary positions)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                        help="add lmforge and transformers in bf16 autocast (default: where the CPU has bf16 units)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="time to quality: both sides' precision (auto: bf16 where the CPU has bf16 units)")
    parser.add_argument("--memory-steps", type=int, default=50, help="steps of the peak-memory runs (0: skip)")
    parser.add_argument("--time-to-quality", action="store_true", help="race lmforge's recipe against the baseline")
    parser.add_argument("--baseline-steps", type=int, default=2500, help="baseline schedule length (time to quality)")
    parser.add_argument("--recipe-steps", type=int, default=1000, help="lmforge schedule length (time to quality)")
    parser.add_argument("--recipe-lr", type=float, default=RECIPE_TRAIN["lr"],
                        help="lmforge peak learning rate (time to quality; default: pretrain's)")
    parser.add_argument("--ttq-eval-every", type=int, default=50)
    parser.add_argument("--readme", action="store_true", help="also save JSON in benchmarks/results/, table in README")
    parser.add_argument("--json-out")
    parser.add_argument("--render", metavar="JSON", help="re-render a saved result's README table (no training)")
    parser.add_argument("--_memory-child", dest="memory_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory(args.memory_child[0], args.memory_child[1], args.memory_steps)
        return
    if args.render:
        result = json.loads(Path(args.render).read_text())
        name = Path(args.render).stem
        table = ttq_table(result) if name == "time_to_quality" else speed_table(result, name.split("_", 1)[1])
        print(table)
        if args.readme:
            publish(name, result, table)
        return
    if args.bf16 is None:
        args.bf16 = cpu_has_native_bf16()  # emulated bf16 (AVX2) is ~100x slower: not worth racing
    if not DATA.is_file():
        sys.exit(f"benchmark data not found: {DATA}")
    result = {"command": command_line("train_bench.py", sys.argv[1:]),
              "machine": machine(), "recipe": RECIPE,
              "optimizers": {"lmforge": "AdamW fused (lmforge default)", "hf": "AdamW foreach (HF Trainer default)"}}
    if args.time_to_quality:
        name, result["benchmark"] = "time_to_quality", "tiny shakespeare: training wall time to a validation loss"
        result.update(time_to_quality(args))
        table = ttq_table(result)
    else:
        shape = CONFIGS[args.config]
        name, result["benchmark"] = f"train_{args.config}", f"training speed, {args.config} config"
        result["shape"] = shape
        result.update(speed(args, shape))
        if args.memory_steps:
            for which in ("lmforge", "hf"):
                out = subprocess.run([sys.executable, __file__, "--_memory-child", which, args.config,
                                      "--memory-steps", str(args.memory_steps)], capture_output=True, text=True,
                                     check=True)
                result[which]["peak_rss_mb"] = float(out.stdout.strip().splitlines()[-1])
        table = speed_table(result, args.config)
    report(name, result, table, args.json_out, args.readme)


if __name__ == "__main__":
    main()
