"""torch.distributed, kept apart from the model and the loop.

`lmforge pretrain` runs unchanged under `torchrun`: this module reads the environment torchrun
sets, starts the process group (gloo on CPU, nccl on GPU), and wraps the model in DDP or, with
`--fsdp`, shards it with FSDP2 (`fully_shard`). The Trainer only asks three questions: am I
rank 0, how do I skip gradient sync on accumulation steps, and what is the average of a number
over ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: float) -> float:
        """Average a Python number over ranks (identity in one process)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def all_true(self, flag: bool) -> bool:
        """True only if every rank says True: ranks must agree on skipping a step."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) == 0.0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world() -> World:
    """Start the process group if torchrun (or any launcher setting WORLD_SIZE > 1) started us."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank, world_size, local_rank, device)


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, fsdp: bool = False) -> nn.Module:
    """DDP by default; FSDP2 shards parameters, gradients and optimizer state across ranks."""
    if not world.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _blocks(model: nn.Module) -> list[nn.Module]:
    stacks = [s for s in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if s is not None]
    return [block for stack in stacks for block in stack.blocks]


def no_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP's no_sync, FSDP2's
    set_requires_gradient_sync); the last micro-step syncs everything accumulated."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(wrapped):
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state, keyed by parameter name.

    One format for one process, DDP and FSDP alike, so a checkpoint written under any of them
    resumes under any other. Under FSDP this gathers (every rank must call it); the full tensors
    land on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def full_weights(model: nn.Module) -> dict:
    """The whole model state alone (the best model is kept without its optimizer); gathers under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Inverse of full_state: every rank passes the same full state and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
