"""`lmforge finetune --task classify|qa|instruct`: a model folder plus labelled data → a fine-tuned
model folder.

The run uses the same Trainer as pretraining (checkpoints, exact resume, torchrun, progress),
through `TaskTrainer`, which draws labelled examples instead of token windows and scores the
task's metric (accuracy, SQuAD F1, the answers' loss) instead of perplexity. The run folder
remembers its task in task.json (labels, columns, how texts become ids), which `predict` and
`eval` read.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import torch

from lmforge.atomic import atomic_write_text
from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.finetune import classify, instruct, lora, qa
from lmforge.finetune.batches import ExampleSampler
from lmforge.finetune.tabular import Row, read_rows
from lmforge.model import build_model
from lmforge.model_folder import adapted_model, load_model, read_task, write_task
from lmforge.tokenize import Tokenizer
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.distributed import init_world
from lmforge.train.pretrain import FINETUNE_DEFAULTS, Run, _as_list, _read_json, refuse_adapter_start
from lmforge.train.trainer import Trainer

TASKS = ("classify", "qa", "instruct")
TASK_FIELDS = ("text_column", "text_pair_column", "label_column", "chat_template", "doc_stride", "max_answer_tokens")
RUN_FIELDS = {"task", "init", "data", "val_data", "out", "resume", *TASK_FIELDS}
MODEL_FIELDS = {"dropout", "attn_dropout", "pooling"}  # what a task run may change about its start model
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
# The fine-tuning schedule; short labelled texts take a larger batch than conversations.
TASK_DEFAULTS = {"classify": {**FINETUNE_DEFAULTS, "batch_size": 32},
                 "qa": {**FINETUNE_DEFAULTS, "batch_size": 16},
                 "instruct": {**FINETUNE_DEFAULTS, "batch_size": 8}}
SELECTION = {"classify": ("accuracy", True), "qa": ("f1", True), "instruct": ("loss", False)}


class TaskTrainer(Trainer):
    """The Trainer, fed a task's examples: a classifier judged by accuracy (higher is better), a QA
    model by SQuAD F1 over its validation questions (`val_questions`, whose windows are
    `val_examples`), an instruction-tuned decoder by the loss of its answers."""

    def __init__(self, model, config, train_examples, val_examples, run_dir, tokenizer, task: dict, world=None,
                 val_questions=None):
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.classify = task["task"] == "classify"
        self.val_questions = val_questions
        self.kind = task["task"]  # make_sampler runs inside Trainer.__init__, which sets self.task to None
        self.selection_metric = SELECTION[task["task"]]
        super().__init__(model, config, train_examples, val_examples, run_dir, tokenizer,
                         objective=task["task"], world=world)
        self.task = task
        mean_length = sum(len(e.input_ids) for e in train_examples) / len(train_examples)
        self.tokens_per_step = round(config.batch_size * config.grad_accum * mean_length * self.world.world_size)

    def make_sampler(self):
        transform = None
        with_segments = self.model.config.type_vocab_size > 0
        if self.kind == "instruct":
            collate = partial(instruct.collate, pad_id=self.pad_id)
        elif self.kind == "qa":
            collate = partial(qa.collate, pad_id=self.pad_id, with_segments=with_segments)
        else:
            self.model.label_smoothing = self.config.label_smoothing
            collate = partial(classify.collate, pad_id=self.pad_id, with_segments=with_segments)
            if self.config.augment:
                transform = partial(classify.augment, how=self.config.augment, prob=self.config.augment_prob,
                                    special_ids=set(self.tokenizer.special_ids))
        return ExampleSampler(self.train_store, self.config.batch_size, self.config.seed, collate,
                              self.world.rank, self.world.world_size, transform)

    def next_batch(self) -> dict:
        return self.sampler.next_batch()

    def evaluate(self, max_batches: int | None = None, full: bool = False) -> dict:
        if self.kind == "qa":
            return qa.score(self.model, self.val_questions, self.val_store, self.config.batch_size, self.pad_id,
                            self.task["max_answer_tokens"])
        scorer = classify.score if self.classify else instruct.score
        return scorer(self.model, self.val_store, self.config.batch_size, self.pad_id)

    def headline(self, result: dict) -> tuple[str, str]:
        if self.kind == "qa":
            return "val_f1", f"{result['f1']:.1f}"
        return ("val_acc", f"{result['accuracy']:.3f}") if self.classify else super().headline(result)


def _split(options: dict, init: str | None) -> tuple[dict, dict, dict]:
    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - RUN_FIELDS - MODEL_FIELDS - TRAIN_FIELDS)
    fixed = sorted(k for k in unknown if k in {f.name for f in fields(ModelConfig)} or k in ("tokenizer", "vocab_size"))
    if fixed:
        raise LmforgeError(f"the model and tokenizer come from {init or '--model'}; drop {', '.join(fixed)}")
    if unknown:
        raise LmforgeError(f"unknown option(s): {', '.join(unknown)}")
    run = {k: v for k, v in options.items() if k in RUN_FIELDS}
    return run, {k: v for k, v in options.items() if k in MODEL_FIELDS}, {k: v for k, v in options.items()
                                                                          if k in TRAIN_FIELDS}


def read_labelled(paths: list[str], task: str = "classify") -> list[tuple[str, list]]:
    """Each file's rows (SQuAD's questions for qa), read once."""
    if task == "qa":
        return [(path, qa.read_squad(path)) for path in paths]
    return [(path, read_rows(path)) for path in paths]


def prepare_task_run(options: dict) -> Run:
    """Build (or rebuild, with resume) a task fine-tuning run; nothing is trained yet. With
    `lora_rank` only LoRA adapters and the task's head train (finetune/lora.py)."""
    options = dict(options)
    lora_spec = lora.take_options(options)
    run_opts, model_opts, train_opts = _split(options, options.get("init"))
    if run_opts.get("task") not in TASKS:
        raise LmforgeError(f"--task must be one of {', '.join(TASKS)}; got {run_opts.get('task')!r}")
    if not run_opts.get("out"):
        raise LmforgeError("--out is required: the run folder to write")
    out = Path(run_opts["out"])
    resume, has_checkpoint = bool(run_opts.get("resume")), bool(checkpoint_dirs(out))
    if has_checkpoint and not resume:
        raise LmforgeError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    restart = resume and (has_checkpoint or (out / "run.json").is_file())
    saved = _read_json(out / "run.json") if restart else {}
    if restart and saved.get("task") != run_opts["task"]:
        raise LmforgeError(f"{out} holds no {run_opts['task']} run to resume")
    for key in ("init", "data", "val_data", *TASK_FIELDS):
        run_opts.setdefault(key, saved.get(key))
    init = run_opts.get("init")
    if not init:
        raise LmforgeError("--model is required: the model folder (lmforge or Hugging Face) to start from")
    if not restart and Path(init).resolve() == out.resolve():
        raise LmforgeError("--out must not be the --model folder: the run would overwrite the model it starts from")
    refuse_adapter_start(init)
    lora_spec = lora.run_spec(lora_spec, saved, restart, out)
    train_paths = _as_list(run_opts.get("data"))
    if not train_paths:
        raise LmforgeError("--data is required: a TSV, CSV or JSONL file of labelled rows")
    new_defaults = {**TASK_DEFAULTS[run_opts["task"]], **(lora_spec.train_defaults if lora_spec else {})}
    train_opts = {**(_read_json(out / "train_config.json") if restart else new_defaults), **train_opts}
    train_config = TrainConfig.from_dict(train_opts)

    world = init_world()
    torch.manual_seed(train_config.seed)
    train_rows = read_labelled(train_paths, run_opts["task"])  # read once: the labels (a new classifier), the examples
    if has_checkpoint:  # the weights come from the checkpoint (Trainer.resume)
        task, tokenizer = read_task(out), Tokenizer.load(out / "tokenizer.json")
        config = ModelConfig.from_dict({**_read_json(out / "config.json"), **model_opts})
        model = adapted_model(config, lora_spec) if lora_spec else build_model(config)
    elif run_opts["task"] == "instruct":
        model, tokenizer, task = _start_instruct(init, model_opts, run_opts)
    elif run_opts["task"] == "qa":
        model, tokenizer, task = _start_qa(init, model_opts, run_opts)
    else:
        model, tokenizer, task = _start_model(init, model_opts, train_rows, run_opts)
    if lora_spec and not has_checkpoint:
        model = lora.start_adapters(model, lora_spec, init)
    if train_config.augment and task["task"] != "classify":
        raise LmforgeError("--augment applies to --task classify")
    val_paths = _as_list(run_opts.get("val_data"))
    val_rows = read_labelled(val_paths, run_opts["task"]) if val_paths else None
    inputs = replace(model.config, block_size=model.max_input_tokens)  # a soft prompt takes its share
    if task["task"] == "qa":
        train, val, notes, val_questions = _qa_examples(train_rows, val_rows, task, tokenizer, inputs, train_config)
    else:
        (train, val, notes), val_questions = _examples(train_rows, val_rows, task, tokenizer, inputs,
                                                       train_config), None
    trainer = TaskTrainer(model, train_config, train, val, out, tokenizer, task, world=world,
                          val_questions=val_questions)
    resumed = trainer.resume() if resume else False
    if not resume:
        trainer.forget_metrics_after(0)
    if task["task"] == "classify":
        what = f"labels: {', '.join(task['labels'])}"
    elif task["task"] == "qa":
        what = (f"answers: spans of the context, windows of {model.max_input_tokens} tokens overlapping by "
                f"{task['doc_stride']}, at most {task['max_answer_tokens']} tokens")
    else:
        what = "answers are the targets"
    summary = "\n".join([*(f"note: {note}" for note in notes), what])
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save(out / "config.json")
        tokenizer.save(out / "tokenizer.json")
        write_task(out, task)
        atomic_write_text(out / "train_config.json", json.dumps(train_config.to_dict(), indent=2) + "\n")
        record = {key: run_opts.get(key) for key in ("task", *TASK_FIELDS)}
        record.update(init=os.path.abspath(init), data=[os.path.abspath(p) for p in train_paths],
                      val_data=[os.path.abspath(p) for p in val_paths] or None,
                      lora=model.lora.to_dict() if getattr(model, "lora", None) else None)
        atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")  # last: the folder is ready
    return Run(trainer, model, tokenizer, resumed, summary, init)


def _start_model(init: str, model_opts: dict, train_rows: list[tuple[str, list[Row]]], run_opts: dict):
    """The classifier a new run starts from: the folder's stack and tokenizer, with a fresh head
    for the training data's labels (or the folder's own head, if it already classifies these)."""
    base, tokenizer = load_model(init)
    if base.config.arch == "encoder-decoder":
        raise LmforgeError(f"{init} is an encoder-decoder; classification needs an encoder or a decoder")
    base_task = read_task(init) or {}
    first_path, first_rows = train_rows[0]
    columns = classify.find_columns(first_rows, first_path, run_opts.get("text_column"),
                                    run_opts.get("text_pair_column"), run_opts.get("label_column"))
    if base_task.get("task") == "classify":
        labels = list(base_task["labels"])
    else:
        labels = classify.label_names([r for _, rows in train_rows for r in rows], columns.label)
    if len(labels) < 2:
        raise LmforgeError(f"{first_path}: classification needs at least two labels; found {labels}")
    template = base_task.get("template") or ("tokenizer" if classify.has_template(tokenizer) else "lmforge")
    config = ModelConfig.from_dict({**base.config.to_dict(), "n_labels": len(labels), **model_opts})
    model = build_model(config)
    keep_head = base.config.n_labels == len(labels)
    state = {k: v for k, v in base.state_dict().items() if keep_head or not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    task = {"task": "classify", "labels": labels, "template": template}  # columns: as given, else found per file
    task.update({key: run_opts.get(key) for key in ("text_column", "text_pair_column", "label_column")})
    return model, tokenizer, task


def _start_qa(init: str, model_opts: dict, run_opts: dict):
    """A QA run starts from an encoder or decoder: its stack and tokenizer, with a fresh span head
    (or the folder's own, if it already answers questions). task.json keeps how questions become
    windows and how long an answer may be."""
    base, tokenizer = load_model(init)
    if base.config.arch == "encoder-decoder":
        raise LmforgeError(f"{init} is an encoder-decoder; extractive QA needs an encoder or a decoder")
    base_task = read_task(init) or {}
    template = base_task.get("template") or ("tokenizer" if classify.has_template(tokenizer) else "lmforge")
    config = ModelConfig.from_dict({**base.config.to_dict(), "n_labels": None, "span_head": True, **model_opts})
    model = build_model(config)
    keep_head = base.config.span_head
    state = {k: v for k, v in base.state_dict().items() if keep_head or not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    def first_given(key, default):
        return next((v for v in (run_opts.get(key), base_task.get(key)) if v is not None), default)

    task = {"task": "qa", "template": template, "doc_stride": first_given("doc_stride", qa.DOC_STRIDE),
            "max_answer_tokens": first_given("max_answer_tokens", qa.MAX_ANSWER_TOKENS)}
    if task["max_answer_tokens"] < 1:
        raise LmforgeError(f"--max-answer-tokens must be at least 1; got {task['max_answer_tokens']}")
    return model, tokenizer, task


def _qa_examples(train_files, val_files, task: dict, tokenizer, config: ModelConfig, train_config: TrainConfig):
    """Training windows, validation windows and their questions (a seeded share of the training
    questions when no --val-data), and one note per file that had questions to skip."""
    notes = []

    def questions_of(files, split):
        found = []
        for _path, (questions, skipped) in files:
            found += questions
            if skipped.count:
                notes.append(skipped.summary())
        if files and not found:
            raise LmforgeError("; ".join(notes) or f"no {split} questions")
        return found

    train, val = questions_of(train_files, "train"), questions_of(val_files or [], "val")
    if not val_files:
        train, val = hold_out(train, train_config, "questions")

    def windows(questions):
        return qa.build_windows(questions, tokenizer, config.block_size, config.arch, task["template"],
                                task["doc_stride"])

    return windows(train), windows(val), notes, val


def _start_instruct(init: str, model_opts: dict, run_opts: dict):
    """An instruction-tuning run starts from a decoder language model, whole; the chat template
    is the one given (a Jinja file), else the folder's own, else lmforge's plain default."""
    base, tokenizer = load_model(init)
    if base.config.arch != "decoder" or base.config.n_labels:
        raise LmforgeError(f"{init} is not a decoder language model; instruction tuning needs one")
    config = ModelConfig.from_dict({**base.config.to_dict(), **model_opts})
    model = build_model(config)
    model.load_state_dict(base.state_dict())
    template = (read_task(init) or {}).get("chat_template") or instruct.DEFAULT_CHAT_TEMPLATE
    if run_opts.get("chat_template"):
        path = Path(run_opts["chat_template"])
        if not path.is_file():
            raise LmforgeError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    instruct.render(template, [{"role": "user", "content": "hi"}], tokenizer, add_generation_prompt=True)  # fails early
    return model, tokenizer, {"task": "instruct", "chat_template": template}


def _examples(train_rows, val_rows, task: dict, tokenizer, config: ModelConfig, train_config: TrainConfig):
    """Train and validation examples (a seeded share of the training rows when no --val-data),
    and one note per file that had rows to skip. No usable row at all is an error."""

    def build(path, rows):
        if task["task"] == "instruct":
            return instruct.build_examples(rows, tokenizer, task["chat_template"], config.block_size, path)
        columns = classify.find_columns(rows, path, task.get("text_column"), task.get("text_pair_column"),
                                        task.get("label_column"))
        return classify.build_examples(rows, columns, task["labels"], tokenizer, config.block_size, config.arch,
                                       task["template"], path)

    notes, built = [], {}
    for split, files in (("train", train_rows), ("val", val_rows or [])):
        examples = []
        for path, rows in files:
            found, skipped = build(path, rows)
            examples += found
            if skipped.count:
                notes.append(skipped.summary())
        if files and not examples:
            raise LmforgeError("; ".join(notes) or f"no {split} rows") from None
        built[split] = examples
    train, val = built["train"], built["val"]
    if not val_rows:
        train, val = hold_out(train, train_config, "rows")
    return train, val, notes


def hold_out(items: list, train_config: TrainConfig, what: str) -> tuple[list, list]:
    """(train, val): a seeded --val-fraction of the items held out for validation."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(train_config.seed)).tolist()
    n_val = max(1, int(len(items) * train_config.val_fraction))
    if len(items) - n_val < 1:
        raise LmforgeError(f"only {len(items)} usable {what}: too few to hold some out; give --val-data")
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
