"""Pretraining end to end: corpus → tokenizer → token store → model → Trainer.

The CLI's `pretrain`, `finetune` and `demo` are thin wrappers over `prepare_run` and
`Trainer.fit`. A run folder remembers its data paths (`run.json`), model (`config.json`),
tokenizer and training options, so `--resume` needs nothing but the folder. With `init` (a model
folder, lmforge's or Hugging Face's) the run starts from that model's weights, architecture and
tokenizer instead of fresh ones: continued pretraining, or fine-tuning on a new domain's text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lmforge.atomic import atomic_write_text
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.store import build_token_stores
from lmforge.errors import LmforgeError
from lmforge.finetune import lora
from lmforge.model import LanguageModel
from lmforge.tokenize import Tokenizer
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.distributed import World, init_world
from lmforge.train.objectives import DEFAULT_FOR_ARCH
from lmforge.train.trainer import Trainer

MODEL_FIELDS = {f.name for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
RUN_FIELDS = {"data", "val_data", "tokenizer", "vocab_size", "dedup", "out", "resume", "init"}
# What a run that starts from a trained model may still change about it: the rest is the model.
INIT_MODEL_FIELDS = {"dropout", "attn_dropout"}
# A decoder trained from scratch gets the recipe that reached tiny Shakespeare's validation 1.88
# soonest (docs/notes.md, "Time to quality" and "Defaults"): rotary positions, ReLU, RMSNorm, no
# biases, lr 3e-3 decaying to 3e-4 over the run. Every value can still be given. Encoders keep
# ModelConfig's and TrainConfig's defaults: the recipe was measured on decoders only, and ReLU before the MLM
# head's norm makes all-zero rows whose normalisation gradient is 1/sqrt(eps).
RECIPE_MODEL = {"position": "rope", "activation": "relu", "norm": "rmsnorm", "bias": False}
RECIPE_TRAIN = {"lr": 3e-3}
# A trained model needs a gentler, shorter schedule than pretraining from scratch.
FINETUNE_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20, "max_steps": 500, "eval_every": 100,
                     "save_every": 100}
DEFAULT_TOKENIZER = "bpe"
DEFAULT_BPE_VOCAB = 4096


@dataclass
class Run:
    trainer: Trainer
    model: LanguageModel
    tokenizer: Tokenizer
    resumed: bool
    corpus_summary: str
    init: str | None = None  # the model folder the run started from, if any


def split_options(options: dict) -> tuple[dict, dict, dict]:
    """Sort flat options (CLI flags and config-file keys share names) into run/model/train."""
    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - MODEL_FIELDS - TRAIN_FIELDS - RUN_FIELDS)
    if unknown:
        raise LmforgeError(f"unknown option(s): {', '.join(unknown)}")
    run = {k: v for k, v in options.items() if k in RUN_FIELDS}
    model = {k: v for k, v in options.items() if k in MODEL_FIELDS}
    train = {k: v for k, v in options.items() if k in TRAIN_FIELDS}
    return run, model, train


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _tokenizer_for(spec: str | None, vocab_size: int | None, documents: list[str]) -> Tokenizer:
    spec = spec or DEFAULT_TOKENIZER
    if spec == "char":
        return Tokenizer.train("char", documents)
    if spec == "bpe":
        return Tokenizer.train("bpe", documents, vocab_size=vocab_size or DEFAULT_BPE_VOCAB)
    return Tokenizer.load(spec)


def prepare_run(options: dict, documents: list[str] | None = None, summary: str = "",
                train_defaults: dict | None = None, require_init: bool = False) -> Run:
    """Build (or rebuild, with resume) everything a training run needs; nothing is trained yet.

    `documents` lets a caller (the demo) supply an already-loaded corpus instead of paths;
    `train_defaults` replace TrainConfig's defaults (and the recipe's) in a new run (a resumed one
    keeps its own); a new decoder from scratch takes RECIPE_MODEL's options unless given;
    `require_init` (the finetune verb) refuses a run that does not start from a model folder;
    `lora_rank` (and `lora_alpha`, `lora_targets`) train LoRA adapters on a frozen --model instead."""
    options = dict(options)
    lora_spec = lora.take_options(options)
    run_opts, model_opts, train_opts = split_options(options)
    if not run_opts.get("out"):
        raise LmforgeError("--out is required: the run folder to write")
    out = Path(run_opts["out"])
    resume = bool(run_opts.get("resume"))
    has_checkpoint = bool(checkpoint_dirs(out))
    if has_checkpoint and not resume:
        raise LmforgeError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    # --resume continues the run in `out`: from its newest checkpoint, or from its start if it
    # died before the first one. run.json is written last, so it marks a fully prepared folder.
    restart = resume and (has_checkpoint or (out / "run.json").is_file())
    saved_run = _read_json(out / "run.json") if restart else {}
    given_init = run_opts.get("init")
    if restart and given_init and saved_run.get("init") != os.path.abspath(given_init):
        raise LmforgeError(f"{out} started from {saved_run.get('init') or 'scratch'}; resume it without --model")
    for key in ("data", "val_data", "dedup", "init"):
        run_opts.setdefault(key, saved_run.get(key))
    init = run_opts.get("init")
    lora_spec = lora.run_spec(lora_spec, saved_run, restart, out)
    if lora_spec and not init:
        raise LmforgeError("LoRA adapts a trained model: lmforge finetune --model FOLDER --lora-rank R")
    if require_init and not init:
        raise LmforgeError(f"--model is required: {out} holds no fine-tuning run to resume" if resume else
                           "--model is required: the model folder (lmforge or Hugging Face) to start from")
    if init:
        fixed = sorted((set(model_opts) - INIT_MODEL_FIELDS) | ({"tokenizer", "vocab_size"} & set(run_opts)))
        if fixed:
            raise LmforgeError(f"the model and tokenizer come from {init}; drop {', '.join(fixed)}")
        if not restart and Path(init).resolve() == out.resolve():
            raise LmforgeError("--out must not be the --model folder: the run would overwrite the model it starts from")
        refuse_adapter_start(init)
    if restart:
        train_opts = {**_read_json(out / "train_config.json"), **train_opts}
        model_opts = {**_read_json(out / "config.json"), **model_opts}
    else:
        recipe = not init and model_opts.get("arch", "decoder") == "decoder"
        train_opts = {**(RECIPE_TRAIN if recipe else {}), **(train_defaults or {}),
                      **(lora_spec.train_defaults if lora_spec else {}), **train_opts}
        if recipe:
            model_opts = {**RECIPE_MODEL, **model_opts}

    if documents is None:
        paths = _as_list(run_opts.get("data"))
        if not paths:
            raise LmforgeError("--data is required: a file, folder or glob of training text")
        documents, stats = load_corpus(paths, dedup=bool(run_opts.get("dedup")))
        summary = stats.summary()
    val_documents = None
    if run_opts.get("val_data"):
        val_documents, _ = load_corpus(_as_list(run_opts["val_data"]), dedup=bool(run_opts.get("dedup")))

    world = init_world()  # one process, or one rank of a torchrun job
    start = None  # the trained model an init run starts from (a checkpoint, if any, replaces it)
    if init and not has_checkpoint:
        start, tokenizer = _load_start(init)
        model_opts = {**start.config.to_dict(), **model_opts}
    elif restart:
        tokenizer = Tokenizer.load(out / "tokenizer.json")
    else:  # rank 0 trains the tokenizer; the other ranks load what it saved
        tokenizer = _main_first(
            world,
            lambda: _save(_tokenizer_for(run_opts.get("tokenizer"), run_opts.get("vocab_size"), documents), out),
            lambda: Tokenizer.load(out / "tokenizer.json"),
        )
    model_opts = {**_token_ids(tokenizer), **model_opts}
    if not init:  # a trained model keeps its own (possibly padded) vocabulary size
        model_opts["vocab_size"] = tokenizer.vocab_size
    model_opts.setdefault("arch", "decoder")
    train_opts.setdefault("objective", DEFAULT_FOR_ARCH.get(model_opts["arch"], "clm"))
    model_config = ModelConfig.from_dict(model_opts)
    train_config = TrainConfig.from_dict(train_opts)
    task_only = [flag for flag, value in (("--label-smoothing", train_config.label_smoothing),
                                          ("--augment", train_config.augment)) if value]
    if task_only:
        raise LmforgeError(f"{', '.join(task_only)} apply to fine-tuning for a task (finetune --task)")

    def build_stores():
        return build_token_stores(documents, tokenizer, val_fraction=train_config.val_fraction,
                                  val_documents=val_documents)

    train_store, val_store = _main_first(world, build_stores, build_stores)  # the others hit its cache
    torch.manual_seed(train_config.seed)
    if lora_spec and has_checkpoint:  # the base from its folder; the adapters from the checkpoint
        from lmforge.model_folder import adapted_model

        model = adapted_model(model_config, lora_spec)
    else:
        model = LanguageModel(model_config)
        if start is not None:
            model.load_state_dict(start.state_dict())
        if lora_spec:
            model = lora.start_adapters(model, lora_spec, init)
    trainer = Trainer(model, train_config, train_store, val_store, out, tokenizer, world=world)
    if resume:
        resumed = trainer.resume()
    else:
        resumed = False
        trainer.forget_metrics_after(0)  # a run that died before its first checkpoint starts over
    if not world.is_main:
        return Run(trainer, model, tokenizer, resumed, summary, init)
    out.mkdir(parents=True, exist_ok=True)
    model_config.save(out / "config.json")
    tokenizer.save(out / "tokenizer.json")
    atomic_write_text(out / "train_config.json", json.dumps(train_config.to_dict(), indent=2) + "\n")
    run_record = {  # absolute paths: --resume works from any working directory
        "data": [os.path.abspath(p) for p in _as_list(run_opts.get("data"))] or None,
        "val_data": [os.path.abspath(p) for p in _as_list(run_opts.get("val_data"))] or None,
        "dedup": run_opts.get("dedup"),
        "init": os.path.abspath(init) if init else None,
        "lora": model.lora.to_dict() if getattr(model, "lora", None) else None,
        "corpus": summary or saved_run.get("corpus"),  # for run reports and model cards (lmforge/insight)
        "tokens": {"train": len(train_store), "val": len(val_store) if val_store is not None else 0},
    }
    atomic_write_text(out / "run.json", json.dumps(run_record, indent=2) + "\n")  # last: the folder is ready
    return Run(trainer, model, tokenizer, resumed, summary, init)


def _load_start(folder) -> tuple[LanguageModel, Tokenizer]:
    from lmforge.model_folder import load_model

    model, tokenizer = load_model(folder)
    if model.config.n_labels:
        raise LmforgeError(f"{folder} is a sequence classifier; a training run continues a language model")
    return model, tokenizer


def refuse_adapter_start(init: str) -> None:
    """A run starts from a whole model; an adapter folder is one only once merged."""
    from lmforge.model_folder import is_adapter_folder

    if is_adapter_folder(init):
        raise LmforgeError(f"{init} is a LoRA adapter folder; merge it into a model first "
                           f"(lmforge merge-lora {init} --out DIR) and start from that")


def _main_first(world: World, on_main, on_others):
    """Rank 0 does the work first (training a tokenizer, filling the token cache); the other
    ranks wait, then load or reuse what it wrote instead of racing it."""
    if world.is_main:
        result = on_main()
        world.barrier()
        return result
    world.barrier()
    return on_others()


def _save(tokenizer: Tokenizer, out: Path) -> Tokenizer:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    return tokenizer


def _token_ids(tokenizer: Tokenizer) -> dict:
    return {
        "pad_token_id": tokenizer.pad_id,
        "eos_token_id": tokenizer.eos_id,
        "bos_token_id": tokenizer.bos_id,
        "mask_token_id": tokenizer.mask_id,
        "decoder_start_token_id": tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id,
    }


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmforgeError(f"cannot parse {path}: {exc}") from None
