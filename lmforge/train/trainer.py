"""The training loop every objective reuses.

AdamW (no decay on norms, biases, embeddings), linear warm-up then cosine decay, gradient
accumulation and clipping, optional bf16 autocast and torch.compile, periodic evaluation,
atomic checkpoints, exact resume, and a guard against non-finite steps.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.atomic import atomic_write_text
from lmforge.config import TrainConfig
from lmforge.data.collate import WindowSampler
from lmforge.errors import LmforgeError
from lmforge.hardware import bf16_native
from lmforge.train.checkpoint import (
    BEST_DIR,
    checkpoint_dirs,
    load_trainer_state,
    publish_model,
    save_best,
    save_checkpoint,
)
from lmforge.train.distributed import World, full_state, full_weights, load_full_state, no_sync, wrap_model
from lmforge.train.objectives import Objective
from lmforge.train.selection import BestModel

METRICS_FILE = "metrics.jsonl"


def configure_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Decay only the matrices of linear layers: norms, biases and embeddings keep their scale."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embedding_ids else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {"lr": config.lr, "betas": (config.beta1, config.beta2)}
    try:  # the fused kernel does the whole update in one pass over memory
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def clip_gradients(parameters, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm, as clip_grad_norm_ does, and
    return the norm before clipping. On CPU, clip_grad_norm_ walks the tensors in Python (its
    foreach path is for GPUs); torch's _foreach kernels loop in C++ instead, a third of the time
    for a small model. Sharded (DTensor) gradients still go through clip_grad_norm_."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or any(type(g) is not torch.Tensor for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    total = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:  # also false for a non-finite norm: that step is skipped, not scaled
        torch._foreach_mul_(grads, scale)
    return total


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to the floor at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr_floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.lr_floor)


class Trainer:
    """Runs one process's share of training; under torchrun every rank runs one (see distributed.py)."""

    selection_metric = ("loss", False)  # what early stopping compares: (metric, higher is better)

    def __init__(self, model, config: TrainConfig, train_store, val_store, run_dir, tokenizer, objective=None,
                 world: World | None = None):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.world = world or World()
        self.run_dir = Path(run_dir)
        self.train_store, self.val_store = train_store, val_store
        self.objective = objective or Objective.for_training(config, model.config, tokenizer)
        room = getattr(model, "max_input_tokens", model.config.block_size)  # less a soft prompt's share
        self.seq_len = block = config.seq_len or room
        if block > room:
            what = f"block_size {model.config.block_size}" + (f" less its {model.config.block_size - room}-vector soft "
                                                              "prompt" if room < model.config.block_size else "")
            raise LmforgeError(f"seq_len {block} is longer than the model's {what}")
        self.sampler = self.make_sampler()
        self.generator = torch.Generator().manual_seed(config.seed + 1 + self.world.rank)  # masking noise
        self.device = self.world.device
        model.to(self.device)
        self.wrapped = wrap_model(model, self.world, fsdp=config.fsdp)  # DDP/FSDP, or the model itself
        self.optimizer = configure_optimizer(model, config)  # after sharding: FSDP replaces parameters
        self.step = 0
        self.bad_steps = 0  # all non-finite steps skipped so far
        self.bad_in_a_row = 0
        self.forward = self._compiled_forward() if config.compile else self.wrapped
        self.bf16 = bf16_native(self.device) if config.bf16 is None else config.bf16
        self.autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        )
        for stack in (model.encoder, model.decoder):
            if stack is not None:
                stack.checkpoint_blocks = config.activation_checkpointing
        self.tokens_per_step = config.batch_size * config.grad_accum * block * self.world.world_size
        self.task: dict | None = None  # a fine-tuned task's metadata (task.json), saved with every checkpoint
        patience = config.early_stopping_patience
        self.best = BestModel(*self.selection_metric, patience) if patience else None
        self.stopped_early = False

    def make_sampler(self):
        """The training batches' source; a task trainer (finetune/) draws labelled examples instead."""
        WindowSampler(self.val_store, self.seq_len, 1, self.config.seed)  # one-line error for a too-short val split
        return WindowSampler(self.train_store, self.seq_len, self.config.batch_size, self.config.seed,
                             self.world.rank, self.world.world_size)

    def next_batch(self) -> dict:
        """The model's keyword arguments for one micro-batch, labels included."""
        x, y = self.sampler.next_batch()
        return self.objective.batch(x, y, self.generator)

    def headline(self, result: dict) -> tuple[str, str]:
        """The validation figure the progress bar shows: (short name, formatted value)."""
        return "val_ppl", f"{result['perplexity']:.2f}"

    # -- one optimisation step ------------------------------------------------------------
    def train_step(self) -> dict:
        """Accumulate grad_accum micro-batches, then clip and update; skip the update (and count
        it) if the loss or gradient is not finite on any rank."""
        self.wrapped.train()
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, finite, accum = 0.0, True, self.config.grad_accum
        for micro in range(accum):
            batch = {k: v.to(self.device) for k, v in self.next_batch().items()}
            with no_sync(self.wrapped, sync=micro == accum - 1):  # all-reduce once, on the last
                with self.autocast:
                    loss = self._run(batch).loss / accum
                objective = loss + self.config.l1_penalty * self._l1() / accum if self.config.l1_penalty else loss
                objective.backward()  # even when not finite: every rank must join the all-reduce
            value = loss.item()
            finite = finite and math.isfinite(value)
            total += value if finite else 0.0
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(self.model.parameters(), clip)
        finite = self.world.all_true(finite and math.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.bad_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": self.world.mean(total) if finite else float("nan"), "lr": lr,
                "grad_norm": grad_norm, "skipped": not finite}

    def _l1(self) -> torch.Tensor:
        """Sum of |w| over the matrices weight decay applies to (the logged loss leaves it out)."""
        return sum(p.abs().sum() for p in self.optimizer.param_groups[0]["params"])

    def _run(self, batch: dict):
        batch = {**batch, "return_logits": False}  # the loss alone: no vocabulary-sized logits kept
        try:
            return self.forward(**batch)
        except Exception as exc:  # a compiler failure shows up at the first call
            if self.forward is self.wrapped:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}); continuing without it", stacklevel=2)
            self.forward = self.wrapped
            return self.wrapped(**batch)

    def _compiled_forward(self):
        try:
            return torch.compile(self.wrapped)
        except Exception as exc:  # e.g. no compiler on this platform
            warnings.warn(f"torch.compile unavailable ({type(exc).__name__}); running eagerly", stacklevel=2)
            return self.wrapped

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None, full: bool = False) -> dict:
        """Validation loss over eval_batches evenly spread batches (max_batches overrides), or
        every validation token with full=True (exact, and gives bits per byte)."""
        from lmforge.evaluate.perplexity import evaluate_store

        limit = None if full else (max_batches or self.config.eval_batches)
        return evaluate_store(
            self.model, self.val_store, self.objective, self.config.batch_size, max_batches=limit,
            seed=self.config.seed, seq_len=self.seq_len,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, optimizer_state: dict) -> dict:
        return {
            "step": self.step,
            "optimizer": optimizer_state,
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "bad_steps": self.bad_steps,
            "train_config": self.config.to_dict(),
            "best": self.best.state_dict() if self.best else None,
            "stopped_early": self.stopped_early,
        }

    def save(self) -> Path | None:
        """Every rank takes part (FSDP gathers shards); rank 0 writes. Returns the folder on rank 0."""
        weights, optimizer_state = full_state(self.model, self.optimizer)
        if not self.world.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.state_dict(optimizer_state),
                               self.config.keep_checkpoints, weights=weights, task=self.task)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint; False (and a clean log) if there is none.

        Rank 0 continues its random streams exactly; other ranks reseed theirs from the step."""
        found = checkpoint_dirs(self.run_dir)
        if not found:
            self.forget_metrics_after(0)
            return False
        from lmforge.model_folder import read_weights, stored_shapes

        state = load_trainer_state(found[-1])
        weights = read_weights(found[-1])  # a LoRA run's checkpoint holds only what trains
        expected = stored_shapes(self.model)
        mismatched = sorted(k for k in expected.keys() | weights.keys()
                            if k not in weights or k not in expected or weights[k].shape != expected[k])
        if mismatched:
            raise LmforgeError(f"checkpoint {found[-1]} does not fit this model ({mismatched[0]} differs); "
                               "model options cannot change on --resume")
        load_full_state(self.model, self.optimizer, weights, state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
        self.stopped_early = bool(state.get("stopped_early"))
        if self.world.is_main:
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        else:
            self.generator.manual_seed(self.config.seed + 1 + self.world.rank + self.step)
            torch.manual_seed(self.config.seed + self.world.rank + self.step)
        self.forget_metrics_after(self.step)
        return True

    def forget_metrics_after(self, step: int) -> None:
        """Drop metrics a crashed run logged after its last checkpoint: they will be redone."""
        path = self.run_dir / METRICS_FILE
        if path.exists() and self.world.is_main:
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log_main(self, record: dict) -> None:
        if not self.world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict:
        """Train to max_steps (or to `until`, for tests and time-boxed runs); returns a summary."""
        from tqdm.auto import tqdm

        config, end = self.config, min(until or self.config.max_steps, self.config.max_steps)
        main = self.world.is_main  # rank 0 alone shows progress and writes logs
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not (config.progress and main),
                   unit="step", dynamic_ncols=True, leave=True)
        last_eval: dict = {}
        started, start_step, window_loss, window_n = time.perf_counter(), self.step, 0.0, 0
        while self.step < end and not self.stopped_early:
            result = self.train_step()
            if result["skipped"]:
                if main:
                    bar.write(f"step {self.step}: non-finite loss or gradient, update skipped")
                if self.bad_in_a_row >= config.max_bad_steps:
                    bar.close()
                    saved = checkpoint_dirs(self.run_dir)
                    where = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
                    raise LmforgeError(
                        f"training stopped: {self.bad_in_a_row} non-finite steps in a row at step {self.step}; "
                        f"{where} (in {self.run_dir}); try a lower --lr"
                    )
            else:
                window_loss, window_n = window_loss + result["loss"], window_n + 1
            elapsed = time.perf_counter() - started
            tokens_per_s = (self.step - start_step) * self.tokens_per_step / max(elapsed, 1e-9)
            if self.step % config.log_every == 0 or self.step == end:
                train_loss = window_loss / window_n if window_n else None  # every step skipped: no loss
                self.log_main({"step": self.step, "split": "train", "loss": train_loss, "lr": result["lr"],
                               "grad_norm": result["grad_norm"], "tokens_per_s": tokens_per_s,
                               "skipped_total": self.bad_steps, "elapsed_s": elapsed})
                bar.set_postfix(loss=f"{train_loss:.3f}" if window_n else "-", tok_s=f"{tokens_per_s:,.0f}",
                                **dict([self.headline(last_eval)] if last_eval else []))
                window_loss, window_n = 0.0, 0
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                last_eval = self.evaluate()  # every rank: a sharded model evaluates collectively
                self.log_main({"step": self.step, "split": "val", **last_eval})
                if main:
                    figures = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if isinstance(v, float))
                    bar.write(f"step {self.step}: val {figures}")
                self.select(last_eval)
            if self.step % config.save_every == 0 or self.step == end or self.stopped_early:
                self.save()
            bar.update(1)
        bar.close()
        if self.best is not None and self.best.step is not None and main:
            publish_model(self.run_dir / BEST_DIR, self.run_dir)  # the run folder's model is the best one
        self.world.barrier()
        return {"step": self.step, "skipped_steps": self.bad_steps, "val": last_eval,
                "seconds": time.perf_counter() - started, "stopped_early": self.stopped_early,
                "best": self.best.summary() if self.best else None}

    def select(self, result: dict) -> None:
        """Early stopping: keep the model if it is the best so far; stop when patience runs out."""
        if self.best is None:
            return
        if self.best.improved(result, self.step):
            weights = full_weights(self.model)  # every rank takes part (FSDP gathers)
            if self.world.is_main:
                save_best(self.run_dir, self.step, self.model, self.tokenizer, weights=weights, task=self.task)
        self.stopped_early = self.best.patience_ran_out
