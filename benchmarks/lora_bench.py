"""LoRA against full fine-tuning on SST-2, from the same MLM-pretrained encoder (finetune_bench.py's
recipe): dev accuracy, trainable parameters, peak memory and time.

Each fine-tune runs in a child process of its own, so its peak resident memory (VmHWM) is its
own; both get the same wall-time budget and the same data. LoRA (rank 8 on q and v, plus the
classifier head) uses lr 1e-3, full fine-tuning finetune_bench's 2e-4: LoRA's few, zero-started
weights take larger steps (the usual practice; not tuned here).

    python benchmarks/lora_bench.py [--pretrain-minutes 6] [--finetune-minutes 5] [--readme]

Prints one JSON object and a markdown table. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402
from finetune_bench import budget_parser, finetune, pretrain, workspace  # noqa: E402

LORA = {"lora_rank": 8, "lora_targets": "q,v", "lr": 1e-3, "min_lr": 1e-4}


def stage(kind: str, start: str, out: str, minutes: float) -> None:
    """Child process: one fine-tune; prints its result and its peak RSS as JSON."""
    result = finetune(Path(start), Path(out), minutes, **(LORA if kind == "lora" else {}))
    status = Path("/proc/self/status").read_text().splitlines()
    result["peak_rss_mb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    print(json.dumps(result))


def table(result: dict) -> str:
    lines = ["| | trainable parameters | peak RSS | fine-tuning | SST-2 dev accuracy | dev macro-F1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, label in (("full", "full fine-tuning"), ("lora", "LoRA r 8 on q, v (+ head)")):
        r = result[name]
        share = 100 * r["trainable_parameters"] / r["parameters"]
        lines.append(f"| {label} | {r['trainable_parameters']:,} ({share:.1f}%) | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['steps']} steps, {r['seconds'] / 60:.1f} min | {100 * r['dev_accuracy']:.1f}% | "
                     f"{r['dev_macro_f1']:.3f} |")
    pre = result["pretrain"]
    lines.append(f"\nBoth start from one encoder pretrained with MLM on SST-2 train's text ({pre['steps']} steps, "
                 f"{pre['seconds'] / 60:.1f} min; finetune_bench.py's shape). Same data and time budget; "
                 "the last model is scored once on the 872 dev sentences.")
    return "\n".join(lines)


def main() -> None:
    parser = budget_parser(__doc__.splitlines()[0], 6.0, 5.0)
    parser.add_argument("--_stage", nargs=4, dest="stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args.stage[0], args.stage[1], args.stage[2], float(args.stage[3]))
        return
    with workspace() as work:
        result = {"command": command_line("lora_bench.py", sys.argv[1:]), "machine": machine(),
                  "benchmark": "SST-2: LoRA against full fine-tuning from one MLM-pretrained encoder", "lora": LORA}
        result["pretrain"] = pretrain(work, args.pretrain_minutes)
        for kind in ("full", "lora"):
            done = subprocess.run([sys.executable, __file__, "--_stage", kind, str(work / "mlm"), str(work / kind),
                                   str(args.finetune_minutes)], capture_output=True, text=True, check=True)
            result[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    report("lora_sst2", result, table(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
