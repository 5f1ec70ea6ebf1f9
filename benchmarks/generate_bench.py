"""Greedy decoding speed on CPU: lmforge (fp32 and int8 weights) against transformers' `generate`.

A GPT-2-small-shaped model (12 layers × 768, vocabulary 50257, 124M parameters) with random
weights is built in transformers, saved, and imported into lmforge (`lmforge.interop.from_hf`),
so both run the same architecture with the same weights. Each run decodes `--new-tokens` tokens
greedily after a `--prompt-tokens`-token prompt, at batch 1 and batch 8; the implementations take
turns (A B C A B C ...) after one warm-up run each, so machine noise hits all alike. Speed counts
new tokens per second including the prompt's prefill.

Batch-1 decoding reads every weight once per token, so memory bandwidth bounds it: the bound is
the read bandwidth (measured here, in the same run, by summing a 512 MB tensor) divided by the
bytes of weights one step reads. Quality of int8: mean per-token NLL of fp32 and int8 on the
same tokens, for the random model and for a small char model trained briefly on tiny Shakespeare.

    python benchmarks/generate_bench.py [--repeats 5] [--readme] [--json-out FILE]

Prints one JSON object and a markdown table; --readme also saves the JSON in benchmarks/results/
and the table in README.md. Never asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SHAPE = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)


def build_models(seed: int = 0):
    """(transformers GPT2LMHeadModel, lmforge fp32 copy, lmforge int8 copy), same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.interop import from_hf
    from lmforge.quantize import quantize_int8
    from lmforge.tokenize import Tokenizer

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    hf.generation_config.eos_token_id = None  # always decode the full count of new tokens
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        Tokenizer.train("char", ["abcdefghijklmnopqrstuvwxyz .,\n"]).save(Path(folder) / "tokenizer.json")
        model, _ = from_hf(folder)
    return hf, model, quantize_int8(copy.deepcopy(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix, bias and norm, but of an embedding
    table only a row per token (so none counted; a tied head still reads the whole matrix)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def read_bandwidth(tensor: torch.Tensor) -> float:
    """GB/s of one sum over a tensor far larger than the caches."""
    start = time.perf_counter()
    tensor.sum()
    return tensor.numel() * tensor.element_size() / (time.perf_counter() - start) / 1e9


def run_lmforge(model, prompts: torch.Tensor, new_tokens: int, compile: bool) -> tuple[float, float, torch.Tensor]:
    """(seconds in total, seconds to the first new token, new token ids)."""
    from lmforge.generate import GenerationConfig, decode_steps

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, compile=compile)
    start, first, out = time.perf_counter(), None, []
    for tokens, _ in decode_steps(model, prompts.tolist(), config, eos_id=None):
        first = first or time.perf_counter() - start
        out.append(tokens)
    return time.perf_counter() - start, first, torch.tensor(out).t()


def run_hf(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, None, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new_tokens, use_cache=True)
    return time.perf_counter() - start, None, out[:, prompts.shape[1]:]


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor) -> float:
    logits = model(ids).logits[:, :-1]
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


def char_model_perplexity(steps: int) -> dict:
    """A 2-layer char model trained `steps` steps on the first 90% of tiny Shakespeare; held-out
    perplexity (first 32 KB of the last 10%) with fp32 and with int8 weights."""
    from lmforge.config import ModelConfig
    from lmforge.model import LanguageModel
    from lmforge.quantize import quantize_int8
    from lmforge.tokenize import Tokenizer

    text = DATA.read_text(encoding="utf-8")
    tokenizer = Tokenizer.train("char", [text])
    ids = torch.tensor(tokenizer.encode(text))
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split : split + 32_768 + 1]
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 129, (16,), generator=generator).tolist()
        batch = torch.stack([train[s : s + 129] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    windows = val[: (len(val) - 1) // 128 * 128 + 1]
    x, y = windows[:-1].view(-1, 128), windows[1:].view(-1, 128)
    with torch.no_grad():
        fp32 = float(model(x, labels=y).loss)
        int8 = float(quantize_int8(copy.deepcopy(model))(x, labels=y).loss)
    return {"train_steps": steps, "fp32_perplexity": math.exp(fp32), "int8_perplexity": math.exp(int8),
            "perplexity_change_percent": 100 * (math.exp(int8 - fp32) - 1)}


def interleaved_runs(runners: dict, prompts: dict, repeats: int) -> tuple[dict, dict, dict, list[float]]:
    """Every runner on every batch, in turns; returns (runs, warm-up seconds, outputs, bandwidths).
    runs[(batch, name)] is a list of (seconds, seconds to the first token); the read bandwidth is
    measured between rounds, so that it sees the same machine state as the decoding."""
    big = torch.ones(128 * 1024 * 1024)  # 512 MB
    runs = {(b, name): [] for b in prompts for name in runners}
    outputs, warmup, bandwidth = {}, {}, [read_bandwidth(big)]
    for repeat in range(repeats + 1):  # repeat 0 warms up (and compiles) and is not counted
        for b, ids in prompts.items():
            for name, run in runners.items():
                seconds, first, outputs[(b, name)] = run(ids)
                if repeat:
                    runs[(b, name)].append((seconds, first))
                else:
                    warmup[(b, name)] = seconds
        bandwidth.append(read_bandwidth(big))
    return runs, warmup, outputs, bandwidth


def rates(runs: list, warmup: float, batch: int, new_tokens: int, bound: float | None) -> dict:
    """Tokens/s with and without the prefill, the fraction of the bandwidth bound, compile time."""
    seconds = [t for t, _ in runs]
    entry = {"new_tokens_per_s": summary([batch * new_tokens / t for t in seconds])}
    if bound is not None:  # lmforge: the time to the first token is the prefill
        entry["decode_only_tokens_per_s"] = statistics.median(batch * (new_tokens - 1) / (t - f) for t, f in runs)
        entry["bandwidth_bound_tokens_per_s"] = bound
        entry["fraction_of_bound"] = entry["new_tokens_per_s"]["median"] / bound
        entry["fraction_of_bound_decode_only"] = entry["decode_only_tokens_per_s"] / bound
    entry["warmup_seconds"] = warmup  # for a compiled run: compilation plus one run
    return entry


def benchmark(args) -> dict:
    hf, fp32, int8 = build_models()
    runners = {}
    for kind, model in (("fp32", fp32), ("int8", int8)):
        for compile in (False, True) if args.compile else (False,):
            name = f"lmforge_{kind}" + ("_compiled" if compile else "")
            runners[name] = lambda p, m=model, c=compile: run_lmforge(m, p, args.new_tokens, c)
    runners["hf_fp32"] = lambda p: run_hf(hf, p, args.new_tokens)
    generator = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, SHAPE["vocab_size"], (b, args.prompt_tokens), generator=generator)
               for b in args.batches}
    runs, warmup, outputs, bandwidth = interleaved_runs(runners, prompts, args.repeats)

    weights = {"fp32": weight_bytes(fp32), "int8": weight_bytes(int8)}
    result = {"read_bandwidth_gb_s": summary(bandwidth), "weight_bytes_per_token": weights}
    bw = statistics.median(bandwidth) * 1e9
    for b in args.batches:
        rows = {}
        for name in runners:
            bound = b * bw / weights[name.split("_")[1]] if name.startswith("lmforge") else None
            rows[name] = rates(runs[(b, name)], warmup[(b, name)], b, args.new_tokens, bound)
        hf_rate = rows["hf_fp32"]["new_tokens_per_s"]["median"]
        for name in runners:
            rows[name]["speedup_vs_hf"] = rows[name]["new_tokens_per_s"]["median"] / hf_rate
        ref, ours = outputs[(b, "hf_fp32")], outputs[(b, "lmforge_fp32")]
        rows["greedy_fp32_equals_hf"] = bool(torch.equal(ref, ours))
        rows["distinct_tokens_in_hf_output"] = len(set(ref.flatten().tolist()))
        same = outputs[(b, "lmforge_int8")] == ours
        rows["int8_greedy_tokens_equal_to_fp32_percent"] = 100 * float(same.float().mean())
        if args.compile:
            rows["compiled_equals_eager"] = all(
                torch.equal(outputs[(b, f"lmforge_{k}_compiled")], outputs[(b, f"lmforge_{k}")]) for k in weights)
        result[f"batch_{b}"] = rows

    # int8 quality on the random model: the fp32 model's own greedy text, scored by both
    largest = max(args.batches)
    text = torch.cat([prompts[largest], outputs[(largest, "lmforge_fp32")]], dim=1)
    nll32, nll8 = mean_nll(fp32, text), mean_nll(int8, text)
    result["random_model_nll"] = {"tokens": text.numel(), "fp32": nll32, "int8": nll8,
                                  "perplexity_change_percent": 100 * (math.exp(nll8 - nll32) - 1)}
    if args.char_steps and DATA.is_file():
        result["char_model"] = char_model_perplexity(args.char_steps)
    return result


def markdown(result: dict, batches: list[int]) -> str:
    names = {"lmforge_fp32": "lmforge fp32", "lmforge_fp32_compiled": "lmforge fp32, compiled",
             "lmforge_int8": "lmforge int8", "lmforge_int8_compiled": "lmforge int8, compiled",
             "hf_fp32": "transformers fp32"}
    lines = ["| batch | implementation | new tokens/s, median (min–max) | × transformers | % of bandwidth bound |",
             "|---:|---|---:|---:|---:|"]
    for b in batches:
        for key, label in names.items():
            if key not in result[f"batch_{b}"]:
                continue
            row = result[f"batch_{b}"][key]
            rate = row["new_tokens_per_s"]
            fraction = f"{100 * row['fraction_of_bound']:.0f}%" if "fraction_of_bound" in row else "–"
            lines.append(f"| {b} | {label} | {rate['median']:.1f} ({rate['min']:.1f}–{rate['max']:.1f}) | "
                         f"{row['speedup_vs_hf']:.2f} | {fraction} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--char-steps", type=int, default=300, help="training steps of the char model (0: skip)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time lmforge with GenerationConfig(compile=True) (default on)")
    parser.add_argument("--markdown", action="store_true", help=argparse.SUPPRESS)  # the table is always printed
    parser.add_argument("--readme", action="store_true", help="also save JSON in benchmarks/results/, table in README")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result = {"benchmark": "greedy decoding, GPT-2-small shape (124M, random weights), lmforge vs transformers",
              "command": command_line("generate_bench.py", sys.argv[1:]), "machine": machine(),
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "batches": args.batches, "repeats": args.repeats, "model": SHAPE}}
    result.update(benchmark(args))
    report("generate", result, markdown(result, args.batches), args.json_out, args.readme)


if __name__ == "__main__":
    main()
