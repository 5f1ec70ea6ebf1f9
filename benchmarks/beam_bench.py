"""Beam-search decoding speed on CPU: lmforge's `beam_search` against transformers' `generate`.

Both decode the same sources of Multi30k's test_2016_flickr (English) with the same model and
the same settings (beam 5, batch 16, early stopping, length penalty 1), batch by batch in file
order, and must return the same tokens; speed is sentences per second over the whole run,
encoder included. The two take turns batch by batch (after one warm-up batch each), so machine
noise hits both alike.

The model, one of three:
- --train-minutes M: the translation Transformer of seq2seq_bench.py (3+3 layers × 256, joint 8k
  BPE) in BART's layout (post-norm, learned positions; transformers' BartForConditionalGeneration
  loads it), trained M minutes on Multi30k here. Its hypotheses end where the model ends them, as
  in real use; a source whose beams are all done costs lmforge nothing more, transformers keeps
  computing it until its whole batch is done.
- --model DIR: that model folder (lmforge's or Hugging Face's; the other side gets a converted copy).
- neither: a random BART-shaped model of a larger translation size (6+6 layers, d=512, 8 heads,
  FFN 2048, a 10,000-token BPE trained on Multi30k's training text). A random model's outputs
  have no natural length, so every hypothesis is held to exactly --length new tokens
  (min_length = max_length): both sides do the same number of steps, the case where dropping
  finished sources gains nothing.

    python benchmarks/beam_bench.py [--sentences 1000] [--train-minutes M | --model DIR] [--readme]

Prints one JSON object and a markdown table; --readme also saves the JSON in benchmarks/results/
and the table in README.md. Never asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k_en_de"
SHAPE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
             encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=256)
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
VOCAB = 10000
TRAINING: dict = {}  # --train-minutes: what timed_fit reports


def random_bart(folder: Path):
    """A random BART-shaped transformers model and its lmforge conversion, saved in `folder`."""
    import transformers

    from lmforge.interop import from_hf
    from lmforge.tokenize import Tokenizer

    lines = (DATA / "train.en").read_text(encoding="utf-8").splitlines()
    lines += (DATA / "train.de").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer.train("bpe", lines, vocab_size=VOCAB, special_tokens=SPECIALS)
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, **SHAPE, scale_embedding=True, forced_eos_token_id=None,
                                     dropout=0.0)
    hf = transformers.BartForConditionalGeneration(config).eval()
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    model, tokenizer = from_hf(folder)
    return hf, model, tokenizer


def given_model(path: Path, folder: Path):
    """(transformers model, lmforge model, encode(texts) -> source ids) for a model folder of either
    kind; a translation run's folder encodes sources as it was trained to (seq2seq/data.py's Sides)."""
    import transformers

    from lmforge.interop import is_hf_folder, to_hf
    from lmforge.model_folder import load_model, read_task
    from lmforge.seq2seq.data import Sides

    model, tokenizer = load_model(path)
    hf_dir = path if is_hf_folder(path) else to_hf(model, tokenizer, folder)
    sides = Sides.from_task(read_task(path), tokenizer)  # as evaluate/seq2seq.py's load_seq2seq, without a second load
    encode = lambda texts: sides.encode_sources(texts, model.config.block_size)  # noqa: E731
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval(), model.eval(), encode


def trained_model(minutes: float, folder: Path) -> Path:
    """seq2seq_bench.py's translation recipe in BART's layout, trained `minutes` on Multi30k."""
    from seq2seq_bench import MULTI30K, TRAIN, TRANSFORMER, timed_fit

    bart_layout = {"norm_position": "post", "position": "learned", "norm": "layernorm", "bias": True,
                   "embedding_norm": True, "tie_embeddings": True, "lm_head_bias": True, "activation": "gelu"}
    out = folder / "trained"
    options = {**TRANSFORMER, **bart_layout, **TRAIN, "task": "translate", "out": str(out),
               "source_file": str(MULTI30K / "train.en"), "target_file": str(MULTI30K / "train.de"),
               "val_source_file": str(MULTI30K / "val.en"), "val_target_file": str(MULTI30K / "val.de")}
    TRAINING.update(timed_fit(options, minutes * 60))
    return out


def run(args) -> dict:
    from lmforge.beam import BeamConfig, beam_search

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_minutes:
            args.model = str(trained_model(args.train_minutes, Path(args.keep_model or tmp)))
        if args.model:
            hf, model, encode = given_model(Path(args.model), Path(tmp))
        else:
            hf, model, tokenizer = random_bart(Path(tmp))
            encode = tokenizer.encode_batch
    sources = (DATA / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[: args.sentences]
    rows = [ids[: args.max_source] for ids in encode(sources)]
    cfg = model.config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else 0
    fixed = not args.model  # a random model: every hypothesis is exactly --length new tokens long
    args.length = args.length or (24 if fixed else 64)
    settings = dict(num_beams=args.beam, early_stopping=True, length_penalty=1.0, max_length=args.length + 1,
                    min_length=args.length + 1 if fixed else 0)
    config = BeamConfig(**settings)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]

    def ours(batch):
        found = beam_search(model, batch, config, eos_token_id=eos, pad_token_id=pad)
        return [hyps[0].tokens + ([eos] if hyps[0].finished else []) for hyps in found]

    def theirs(batch):
        width = max(map(len, batch))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch])
        out = hf.generate(ids, attention_mask=(ids != pad).long(), do_sample=False, **settings)
        return [seq[1:].tolist() for seq in out]  # without the decoder start token

    times = {"lmforge": 0.0, "transformers": 0.0}
    same = 0
    with torch.inference_mode():
        ours(batches[0])  # warm-up
        theirs(batches[0])
        for batch in batches:
            start = time.perf_counter()
            a = ours(batch)
            times["lmforge"] += time.perf_counter() - start
            start = time.perf_counter()
            b = theirs(batch)
            times["transformers"] += time.perf_counter() - start
            for mine, ref in zip(a, b, strict=True):  # theirs is padded to the batch's longest
                same += ref[: len(mine)] == mine and all(t == pad for t in ref[len(mine) :])
    n = len(rows)
    speed = {name: n / seconds for name, seconds in times.items()}
    return {
        "command": command_line("beam_bench.py", sys.argv[1:]),
        "machine": machine(),
        "model": model_name(args),
        **({"training": TRAINING} if TRAINING else {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sentences": n, "batch": args.batch, "beam": args.beam,
        "lengths": f"exactly {args.length} new tokens" if fixed else f"at most {args.length} new tokens",
        "seconds": times, "sentences_per_second": speed,
        "speedup": speed["lmforge"] / speed["transformers"],
        "identical_outputs": f"{same}/{n}",
        "note": args.note,
    }


def model_name(args) -> str:
    if args.train_minutes:
        return (f"seq2seq_bench.py's Transformer (3+3 × 256, vocab 8000) in BART's layout, trained "
                f"{args.train_minutes:g} minutes ({TRAINING.get('steps', 0):,} steps) on Multi30k")
    return args.model or "random BART-shaped " + ", ".join(f"{k}={v}" for k, v in SHAPE.items()) + f", vocab {VOCAB}"


def table(result: dict) -> str:
    speed = result["sentences_per_second"]
    return "\n".join([
        f"Beam {result['beam']}, batch {result['batch']}, {result['sentences']} sentences of Multi30k test_2016_flickr "
        f"(en), {result['lengths']}; model: {result['model']}.",
        "",
        "| decoder | sentences/s | seconds |",
        "|---|---:|---:|",
        *(f"| {name} | {speed[name]:.2f} | {result['seconds'][name]:.1f} |" for name in ("lmforge", "transformers")),
        "",
        f"lmforge is **{result['speedup']:.2f}×** transformers' `generate`; identical outputs: "
        f"{result['identical_outputs']}." + (f" {result['note']}" if result.get("note") else ""),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (lmforge or Hugging Face); default: a random BART-shaped one")
    parser.add_argument("--train-minutes", type=float, help="train seq2seq_bench's Transformer, BART layout, this long")
    parser.add_argument("--keep-model", help="with --train-minutes: train in this folder, and keep it")
    parser.add_argument("--sentences", type=int, default=1000, help="the first N sentences of test_2016_flickr")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--length", type=int,
                        help="new tokens: exactly this many for the random model (default 24); at most this many "
                             "for a trained one (default 64)")
    parser.add_argument("--max-source", type=int, default=128, help="source tokens kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="a sentence printed under the table (how the machine was loaded)")
    parser.add_argument("--readme", action="store_true", help="save the JSON and update README.md's table")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args)
    report("beam", result, table(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
