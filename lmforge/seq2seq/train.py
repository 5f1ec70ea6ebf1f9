"""Training translators and summarisers through the shared Trainer.

`lmforge finetune --task translate|summarize --model DIR` starts from a model folder (an
encoder-decoder, lmforge's or a converted BART); `lmforge pretrain --objective seq2seq` (or
`--arch lstm`) builds a new model and its BPE from the pairs. Either way the Trainer does the
rest: checkpoints, exact resume, torchrun, progress. The decoder learns by teacher forcing with
label smoothing; validation decodes held-out sources greedily and scores BLEU (translation) or
ROUGE-L (summaries), and the best-scoring model is the one the run folder ends with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lmforge.atomic import atomic_write_text
from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.finetune.batches import ExampleSampler
from lmforge.model import build_model
from lmforge.model_folder import load_model, read_task, write_task
from lmforge.seq2seq.data import IGNORE, Sides, TextPair, build_examples, collate, padding_fraction, read_pairs
from lmforge.seq2seq.decode import DecodeOptions, decode_batch, start_token
from lmforge.tokenize import Tokenizer
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.distributed import init_world
from lmforge.train.pretrain import FINETUNE_DEFAULTS, Run, _as_list, _read_json, _token_ids
from lmforge.train.trainer import Trainer

TASKS = ("translate", "summarize")
SEQ2SEQ_ARCHS = ("encoder-decoder", "lstm")
DATA_FIELDS = ("source_file", "target_file", "data", "val_source_file", "val_target_file", "val_data",
               "source_column", "target_column")
RUN_FIELDS = {"task", "init", "out", "resume", "objective", "separate_vocab", "vocab_size", "tokenizer",
              "max_source_len", "max_target_len", "max_length_ratio", "val_decode", *DATA_FIELDS}
MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# Vaswani et al.'s regularisers, and evaluation often enough to keep the best model of a short run.
SEQ2SEQ_DEFAULTS = {"label_smoothing": 0.1, "early_stopping_patience": 20, "dropout": 0.1}
SCRATCH_TRAIN = {"lr": 7e-4, "warmup_steps": 400, "max_steps": 4000, "batch_size": 64, "eval_every": 500,
                 "save_every": 500, "weight_decay": 0.01, "beta2": 0.98}
RUN_DEFAULTS = {"translate": {"max_length_ratio": 3.0, "val_decode": 500},
                "summarize": {"max_length_ratio": None, "val_decode": 200}}
DEFAULT_VOCAB = 8000


def wants_seq2seq(command: str, options: dict) -> bool:
    """Whether a pretrain or finetune command line is a seq2seq run (cli/training.py's plan_run asks)."""
    if options.get("task") in TASKS:
        return True
    return command == "pretrain" and (options.get("objective") == "seq2seq" or options.get("arch") == "lstm"
                                      or any(options.get(k) for k in ("source_file", "target_file")))


class Seq2SeqTrainer(Trainer):
    """The Trainer fed parallel examples; validation is loss, then BLEU or ROUGE-L of greedy output."""

    def __init__(self, model, config, train_examples, val_examples, val_pairs, run_dir, sides: Sides, task: dict,
                 world=None):
        self.sides, self.val_pairs = sides, val_pairs
        self.summarize = task["task"] == "summarize"
        self.selection_metric = ("rougeL", True) if self.summarize else ("bleu", True)
        super().__init__(model, config, train_examples, val_examples, run_dir, sides.target, objective=task["task"],
                         world=world)
        self.task = task
        mean = sum(len(e.input_ids) + len(e.target_ids) for e in train_examples) / len(train_examples)
        self.tokens_per_step = round(config.batch_size * config.grad_accum * mean * self.world.world_size)

    def make_sampler(self):
        start = start_token(self.model.config)
        collate_fn = partial(collate, pad_id=self.sides.pad_id, start_id=start)
        return ExampleSampler(self.train_store, self.config.batch_size, self.config.seed, collate_fn,
                              self.world.rank, self.world.world_size, length=_pair_length)

    def next_batch(self) -> dict:
        return self.sampler.next_batch()

    def _run(self, batch: dict):
        """Cross-entropy with label smoothing: part of each target's probability spread over the
        vocabulary (the plain loss path of the model has none)."""
        if not self.config.label_smoothing:
            return super()._run(batch)
        labels = batch["labels"]
        logits = super()._run({k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.config.label_smoothing)
        return SimpleNamespace(loss=loss)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None, full: bool = False) -> dict:
        result = score_loss(self.model, self.val_store, self.config.batch_size, self.sides.pad_id)
        limit = self.task.get("val_decode") or len(self.val_store)
        result.update(decode_metrics(self.model, self.sides, self.val_store[:limit], self.val_pairs,
                                     self.summarize, self.config.batch_size, self.task.get("max_target_len")))
        return result

    def headline(self, result: dict) -> tuple[str, str]:
        name = self.selection_metric[0]
        return f"val_{name}", f"{result[name]:.2f}"


def _pair_length(example) -> tuple[int, int]:
    """Batches group by source length, then target length: both sides pad to their longest."""
    return len(example.input_ids), len(example.target_ids)


@torch.no_grad()
def score_loss(model, examples, batch_size: int, pad_id: int) -> dict:
    """Teacher-forced loss and perplexity over every target token (no smoothing)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start = start_token(model.config)
    total, count = 0.0, 0
    for k in range(0, len(examples), batch_size):
        batch = collate(examples[k:k + batch_size], pad_id, start)
        targets = int((batch["labels"] != IGNORE).sum())
        loss = model(**{key: v.to(device) for key, v in batch.items()}, return_logits=False).loss
        total, count = total + float(loss) * targets, count + targets
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def decode_metrics(model, sides: Sides, examples, pairs: list[TextPair], summarize: bool, batch_size: int,
                   max_len: int | None = None) -> dict:
    """Greedy output for these examples scored against their pairs' targets."""
    from lmforge.evaluate.metrics import bleu, chrf, rouge

    was_training = model.training
    options = DecodeOptions(batch_size=batch_size, max_len_a=3.0 if summarize else 1.5, max_len=max_len)
    hypotheses = []
    for k in range(0, len(examples), batch_size):
        chunk = examples[k:k + batch_size]
        hypotheses += [found[0][0] for found in decode_batch(model, sides, [e.input_ids for e in chunk], options)]
    model.train(was_training)
    references = [pairs[e.index].target for e in examples]
    if summarize:
        return rouge(hypotheses, references)
    return {"bleu": bleu(hypotheses, references)["score"], "chrf": chrf(hypotheses, references)["score"]}


def _split(options: dict, init: str | None) -> tuple[dict, dict, dict]:
    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - RUN_FIELDS - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise LmforgeError(f"unknown option(s): {', '.join(unknown)}")
    run = {k: v for k, v in options.items() if k in RUN_FIELDS}
    model = {k: v for k, v in options.items() if k in MODEL_FIELDS and k != "vocab_size"}  # that is the BPE's
    if init:
        fixed = sorted((set(model) - {"dropout", "attn_dropout"}) | ({"vocab_size", "separate_vocab", "tokenizer"}
                                                                     & set(run)))
        if fixed:
            raise LmforgeError(f"the model and tokenizer come from {init}; drop {', '.join(fixed)}")
    return run, model, {k: v for k, v in options.items() if k in TRAIN_FIELDS}


def _read_all(run: dict, prefix: str) -> tuple[list[TextPair], list[str]]:
    """Pairs of one split (train: prefix "", validation: "val_") and the skip notes."""
    files = [(run.get(f"{prefix}source_file"), run.get(f"{prefix}target_file"), None)]
    if run.get(f"{prefix}data"):
        if files[0][0] or files[0][1]:
            raise LmforgeError(f"give either --{prefix.replace('_', '-')}source-file/target-file or "
                               f"--{prefix.replace('_', '-')}data, not both")
        files = [(None, None, path) for path in _as_list(run[f"{prefix}data"])]
    elif not (files[0][0] or files[0][1]):
        return [], []
    pairs, notes = [], []
    for source, target, data in files:
        found, skipped = read_pairs(source, target, data, run.get("source_column"), run.get("target_column"))
        pairs += found
        if skipped.count:
            notes.append(skipped.summary())
    return pairs, notes


def prepare_seq2seq_run(options: dict) -> Run:
    """Build (or rebuild, with resume) a translation or summarisation run; nothing trains yet."""
    options = dict(options)
    run, model_opts, train_opts = _split(options, options.get("init"))
    objective = run.pop("objective", "seq2seq")
    if objective != "seq2seq":
        raise LmforgeError(f"parallel data trains with --objective seq2seq; got {objective!r}")
    if not run.get("out"):
        raise LmforgeError("--out is required: the run folder to write")
    out = Path(run["out"])
    resume, has_checkpoint = bool(run.get("resume")), bool(checkpoint_dirs(out))
    if has_checkpoint and not resume:
        raise LmforgeError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    restart = resume and (has_checkpoint or (out / "run.json").is_file())
    saved = _read_json(out / "run.json") if restart else {}
    if restart and saved.get("task") not in TASKS:
        raise LmforgeError(f"{out} holds no translate or summarize run to resume")
    for key, value in saved.items():
        run.setdefault(key, value)
    task_name = run.setdefault("task", "translate")
    for key, value in RUN_DEFAULTS[task_name].items():
        run.setdefault(key, value)
    init = run.get("init")
    if init and not restart and Path(init).resolve() == out.resolve():
        raise LmforgeError("--out must not be the --model folder: the run would overwrite the model it starts from")
    defaults = {**SEQ2SEQ_DEFAULTS, **(FINETUNE_DEFAULTS if init else SCRATCH_TRAIN)}
    train_opts = {**(_read_json(out / "train_config.json") if restart else
                     {k: v for k, v in defaults.items() if k in TRAIN_FIELDS}), **train_opts}
    train_config = TrainConfig.from_dict(train_opts)
    if not restart and not init:
        model_opts = {"dropout": defaults["dropout"], **model_opts}

    train_pairs, notes = _read_all(run, "")
    if not train_pairs:
        raise LmforgeError("; ".join(notes) or "no parallel data: give --source-file and --target-file, "
                           "or --data FILE.tsv|.jsonl with source and target columns")
    val_pairs, val_notes = _read_all(run, "val_")
    notes += val_notes
    world = init_world()
    torch.manual_seed(train_config.seed)
    if has_checkpoint:
        task = read_task(out) or {}
        sides = Sides.from_task(task, Tokenizer.load(out / "tokenizer.json"))
        config = ModelConfig.from_dict({**_read_json(out / "config.json"), **model_opts})
        model = build_model(config)
    elif init:
        model, sides = _start_from(init, model_opts)
    else:
        sides, model = _new_model(run, model_opts, train_pairs, out, world)
    task = {"task": task_name, "objective": "seq2seq", "max_source_len": run.get("max_source_len"),
            "max_target_len": run.get("max_target_len"), "val_decode": run.get("val_decode"), **sides.task_fields()}
    block = model.config.block_size
    limits = dict(max_source_len=min(run.get("max_source_len") or block, block),
                  max_target_len=min(run.get("max_target_len") or block - 1, block - 1),
                  max_ratio=run.get("max_length_ratio"), truncate_source=task_name == "summarize")
    if not val_pairs:
        order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(train_config.seed)).tolist()
        n_val = min(max(1, int(len(train_pairs) * train_config.val_fraction)), 2000)
        if len(train_pairs) - n_val < 1:
            raise LmforgeError(f"only {len(train_pairs)} usable pairs: too few to hold some out; give validation data")
        val_pairs, train_pairs = [train_pairs[i] for i in order[:n_val]], [train_pairs[i] for i in order[n_val:]]
    train, dropped = build_examples(train_pairs, sides, **limits)
    val, val_dropped = build_examples(val_pairs, sides, **{**limits, "max_ratio": None})
    notes += [f"train: {d.summary()}" for d in (dropped,) if d.count]
    notes += [f"val: {d.summary()}" for d in (val_dropped,) if d.count]
    if not train or not val:
        raise LmforgeError("; ".join(notes) or "no usable pairs")
    trainer = Seq2SeqTrainer(model, train_config, train, val, val_pairs, out, sides, task, world=world)
    resumed = trainer.resume() if resume else False
    if not resume:
        trainer.forget_metrics_after(0)
    batches = trainer.sampler._batches  # this epoch's buckets: what padding the length grouping leaves
    vocab = f"separate BPE {sides.target.vocab_size} target + {sides.source.vocab_size} source" if sides.source \
        else f"joint BPE {sides.target.vocab_size}" if sides.target.kind == "bpe" else f"{sides.target.kind} tokenizer"
    notes.append(f"{task_name}: {vocab}; padding {padding_fraction(batches, train):.1%} of batch positions")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save(out / "config.json")
        sides.target.save(out / "tokenizer.json")
        write_task(out, task)
        atomic_write_text(out / "train_config.json", json.dumps(train_config.to_dict(), indent=2) + "\n")
        record = {k: run.get(k) for k in RUN_FIELDS - {"out", "resume", "objective"}}
        for key in ("source_file", "target_file", "val_source_file", "val_target_file"):
            record[key] = os.path.abspath(record[key]) if record.get(key) else None
        for key in ("data", "val_data"):
            record[key] = [os.path.abspath(p) for p in _as_list(record.get(key))] or None
        record["init"] = os.path.abspath(init) if init else None
        atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")  # last: the folder is ready
    summary = "\n".join(f"note: {note}" if not note.startswith(task_name) else note for note in notes)
    return Run(trainer, model, sides.target, resumed, summary, init)


def _start_from(init: str, model_opts: dict):
    base, tokenizer = load_model(init)
    if base.config.arch not in SEQ2SEQ_ARCHS:
        raise LmforgeError(f"{init} is a {base.config.arch} model; translation and summaries need an "
                           "encoder-decoder (or an LSTM seq2seq folder)")
    config = ModelConfig.from_dict({**base.config.to_dict(), **model_opts})
    model = build_model(config)
    model.load_state_dict(base.state_dict())
    return model, Sides.from_task(read_task(init), tokenizer)


def _new_model(run: dict, model_opts: dict, pairs: list[TextPair], out: Path, world):
    """A new model and its BPE (trained on the training pairs by rank 0; the others load it)."""
    if run.get("tokenizer") not in (None, "bpe"):
        raise LmforgeError("a new seq2seq model trains its own byte-level BPE (--vocab-size, --separate-vocab)")
    if world.is_main:
        sides = Sides.train(pairs, run.get("vocab_size") or DEFAULT_VOCAB, bool(run.get("separate_vocab")))
        out.mkdir(parents=True, exist_ok=True)
        sides.target.save(out / "tokenizer.json")
        write_task(out, {"task": run["task"], **sides.task_fields()})
    world.barrier()
    if not world.is_main:
        sides = Sides.from_task(_read_json(out / "task.json"), Tokenizer.load(out / "tokenizer.json"))
    opts = {"arch": "encoder-decoder", **_token_ids(sides.target), **model_opts, "vocab_size": sides.vocab_size}
    if opts["arch"] not in SEQ2SEQ_ARCHS:
        raise LmforgeError(f"--arch {opts['arch']} cannot translate; use encoder-decoder or lstm")
    return sides, build_model(ModelConfig.from_dict(opts))
