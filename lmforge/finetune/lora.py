"""LoRA: train small low-rank updates beside a frozen model's linear layers (Hu et al., 2021).

A target layer computes `W x + b + (alpha / rank) · B A x`, with A (rank × in) random and B
(out × rank) zero at the start, so a new adapter changes nothing until it trains. Targets have
names a user knows, mapped onto lmforge's layers: q, k and v are column ranges of the fused
`attn.qkv` output (and of cross-attention's `q` and `kv`), o is `attn.proj`, ffn is `ffn.up` and
`ffn.down`. A fused layer with several targets keeps one (A, B) pair per target: each is the
rank-r update of its own slice, as it would be for separate q/k/v layers.

The same spec, adapter folder and freezing serve prompt tuning (`prompt_tokens`, with rank 0
unless both are asked for): finetune/prompt_tuning.py adds the soft prompt.

This module knows layers and tensors only (it imports nothing above model/); model_folder.py
reads and writes adapter folders, and interop/peft.py exports them in PEFT's format.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.finetune import prompt_tuning
from lmforge.model.attention import Attention
from lmforge.model.layers import FeedForward
from lmforge.model.linear import Linear

TARGETS = ("q", "k", "v", "o", "ffn")
DEFAULT_TARGETS = ("q", "v")  # PEFT's usual choice for attention, and the LoRA paper's
# alpha = 2·rank makes the update's scale alpha/rank = 2 whatever the rank, so trying another
# rank does not also change the effective step size (PEFT's default, alpha 8 with rank 8, is 1).
ALPHA_PER_RANK = 2.0
# A frozen model with B = 0 learns slowly at full fine-tuning's lr 1e-4: LoRA runs start from
# the Alpaca-LoRA recipe's lr (3e-4 with rank 8, alpha 16). Every value can still be given.
TRAIN_DEFAULTS = {"lr": 3e-4, "min_lr": 3e-5}
OPTIONS = ("lora_rank", "lora_alpha", "lora_targets", "prompt_tuning")


@dataclass(frozen=True)
class LoraSpec:
    """What adapter.json records: the adapters' shape, and the base model they apply to."""

    rank: int  # 0: no LoRA matrices (a prompt-tuning run)
    alpha: float
    targets: tuple[str, ...]
    base: str = ""  # the base model folder, absolute
    base_fingerprint: str = ""  # sha256 of the base weights the adapters were trained on
    prompt_tokens: int = 0  # soft prompt vectors (prompt tuning); 0: none

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def train_defaults(self) -> dict:
        return TRAIN_DEFAULTS if self.rank else prompt_tuning.TRAIN_DEFAULTS

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        return cls(int(data["rank"]), float(data["alpha"]), tuple(data["targets"]), str(data.get("base", "")),
                   str(data.get("base_fingerprint", "")), int(data.get("prompt_tokens", 0)))

    def same_shape(self, other: LoraSpec) -> bool:
        return ((self.rank, self.alpha, self.targets, self.prompt_tokens)
                == (other.rank, other.alpha, other.targets, other.prompt_tokens))


def take_options(options: dict) -> LoraSpec | None:
    """Pop the --lora-* and --prompt-tuning options from a run's flat options; the spec they ask
    for, or None."""
    given = {key.replace("-", "_"): options.pop(key) for key in list(options) if key.replace("-", "_") in OPTIONS}
    rank, alpha, targets, prompt = (given.get(key) for key in OPTIONS)
    prompt = 0 if prompt is None else prompt_tuning.check_length(prompt)
    if rank is None:
        extra = [flag for flag, value in (("--lora-alpha", alpha), ("--lora-targets", targets)) if value is not None]
        if extra:
            need = "need" if len(extra) > 1 else "needs"
            raise LmforgeError(f"{' and '.join(extra)} {need} --lora-rank (the adapters' rank; e.g. 8)")
        return LoraSpec(0, 0.0, (), prompt_tokens=prompt) if prompt else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LmforgeError(f"--lora-rank must be a whole number of at least 1; got {rank!r}")
    if alpha is None:
        alpha = ALPHA_PER_RANK * rank
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise LmforgeError(f"--lora-alpha must be a positive number; got {alpha!r}")
    return LoraSpec(rank, float(alpha), parse_targets(DEFAULT_TARGETS if targets is None else targets),
                    prompt_tokens=prompt)


def parse_targets(value) -> tuple[str, ...]:
    """'q,v' or ['q', 'v'] → ('q', 'v'), in TARGETS order; an unknown name is an error."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else map(str, value))]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        problem = f"unknown target {unknown[0]!r}" if unknown else "is empty"
        raise LmforgeError(f"--lora-targets{':' if unknown else ''} {problem} (choose from {','.join(TARGETS)})")
    return tuple(t for t in TARGETS if t in names)


class LoraLinear(Linear):
    """A Linear (its weight and bias shared, not copied) plus one low-rank update per named
    column range of its output. `weight` and `bias` keep their state-dict names, so the base
    model's weights load into an adapted model as they are."""

    def __init__(self, layer: Linear, slices: dict[str, tuple[int, int]], rank: int, scaling: float):
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self.slices, self.rank, self.scaling = dict(slices), rank, scaling
        like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.lora_A = nn.ParameterDict({name: nn.Parameter(torch.empty(rank, self.in_features, **like))
                                        for name in slices})
        self.lora_B = nn.ParameterDict({name: nn.Parameter(torch.zeros(stop - start, rank, **like))
                                        for name, (start, stop) in slices.items()})
        for a in self.lora_A.values():  # as nn.Linear (and PEFT) initialise A; B = 0 makes the update 0
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def stacked_A(self) -> torch.Tensor:
        """(n·rank, in): every slice's A, in slice order."""
        return torch.cat([self.lora_A[name] for name in self.slices])  # (a ParameterDict may sort its keys)

    def spread_B(self) -> torch.Tensor:
        """(out, n·rank): slice i's B in its own output rows and in A's rank columns i·r..(i+1)·r, zero
        elsewhere. spread_B @ stacked_A is then the sum of every slice's B A in its rows: the fused
        layer's update, one rank-(n·r) product (what merging adds, and what PEFT gets for a fused layer)."""
        spread = self.lora_B[next(iter(self.slices))].new_zeros(self.out_features, self.rank * len(self.slices))
        for i, (name, (start, stop)) in enumerate(self.slices.items()):
            spread[start:stop, i * self.rank:(i + 1) * self.rank] = self.lora_B[name]
        return spread

    def delta_weight(self) -> torch.Tensor:
        """The update as a change of `weight`: scaling · B A, (out, in)."""
        return self.scaling * (self.spread_B() @ self.stacked_A())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.stacked_A()), self.spread_B())
        return super().forward(x) + self.scaling * update


def _layer_targets(module: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """{attribute: {target: (first, last + 1) output column}} for one Attention or FeedForward."""
    if isinstance(module, FeedForward):
        return {name: {"ffn": (0, getattr(module, name).out_features)} for name in ("up", "down")}
    q_width, kv_width = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
    out = {"proj": {"o": (0, module.proj.out_features)}}
    if module.cross:
        return {**out, "q": {"q": (0, q_width)}, "kv": {"k": (0, kv_width), "v": (kv_width, 2 * kv_width)}}
    return {**out, "qkv": {"q": (0, q_width), "k": (q_width, q_width + kv_width),
                           "v": (q_width + kv_width, q_width + 2 * kv_width)}}


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Give `model`'s target layers fresh adapters (in place), freeze everything but the adapters
    and a classifier's head, and remember the spec on `model.lora` (save_model reads it)."""
    if getattr(model, "lora", None) is not None:
        raise LmforgeError("the model already has LoRA adapters; merge them first (lmforge merge-lora)")
    if spec.prompt_tokens:
        prompt_tuning.add_soft_prompt(model, spec.prompt_tokens)
    for module in list(model.modules()) if spec.rank else ():
        if not isinstance(module, Attention | FeedForward):
            continue
        for attribute, slices in _layer_targets(module).items():
            chosen = {name: span for name, span in slices.items() if name in spec.targets}
            if chosen:
                setattr(module, attribute, LoraLinear(getattr(module, attribute), chosen, spec.rank, spec.scaling))
    model.lora = spec
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_weight(name, model.config))
    return model


def is_adapter_weight(name: str, config) -> bool:
    """What trains and what adapter.safetensors holds: the LoRA matrices and a classifier's head."""
    return (".lora_A." in name or ".lora_B." in name or name == "soft_prompt"
            or bool(config.task_head and name.startswith("head.")))


def adapter_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def merge(model: nn.Module, fold: bool = True) -> nn.Module:
    """Replace every LoraLinear by a plain Linear, in place; with fold, its weight gains the update
    (scaling · B A), so the model computes what the adapted one did. fold=False strips the adapters:
    the base model (with a classifier's trained head). Every parameter trains again. A soft prompt
    stays: it is an input, not a change of weights, so folding cannot remove it."""
    for name, layer in adapter_layers(model).items():
        parent_name, _, attribute = name.rpartition(".")
        plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        if fold:
            plain.weight.add_(layer.delta_weight().to(plain.weight.dtype))
        setattr(model.get_submodule(parent_name), attribute, plain)
    model.lora = None
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights the adapters do not hold (names, shapes, dtypes and bytes): an
    adapter applied to another base than the one it was trained on would silently compute
    something else, so loading compares this. ~1 s per 500 MB of weights."""
    digest = hashlib.sha256()
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.proj.weight", None)
    for name in sorted(state):
        if is_adapter_weight(name, model.config):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def with_base(spec: LoraSpec, model: nn.Module, base: str) -> LoraSpec:
    """The spec of a new run: its base folder and the fingerprint of the weights it starts from."""
    return replace(spec, base=base, base_fingerprint=base_fingerprint(model))


def trainable_line(model: nn.Module) -> str:
    """'trainable: 12,288 of 1.2M parameters (1.0%)', printed when a LoRA run starts."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return f"trainable: {trainable:,} of {_short(total)} parameters ({trainable / max(total, 1):.1%})"


def _short(count: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


def run_spec(given: LoraSpec | None, saved_run: dict, restart: bool, out) -> LoraSpec | None:
    """A run's LoRA spec: the one given; on --resume the run's own (run.json), which the flags may
    repeat but not change."""
    if not restart:
        return given
    saved = saved_run.get("lora")
    if saved is None:
        if given is not None:
            raise LmforgeError(f"{out} is not a LoRA run; LoRA cannot be added on --resume")
        return None
    spec = LoraSpec.from_dict(saved)
    if given is not None and not given.same_shape(spec):
        what = [f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {','.join(spec.targets)}"] if spec.rank else []
        what += [f"a {spec.prompt_tokens}-vector soft prompt"] if spec.prompt_tokens else []
        options = "LoRA options" if spec.rank else "--prompt-tuning"  # a prompt-tuning run has no rank to name
        raise LmforgeError(f"{out} trains {' and '.join(what)}; {options} cannot change on --resume")
    return spec


def start_adapters(model: nn.Module, spec: LoraSpec, base: str) -> nn.Module:
    """A new run's adapters on `model` (which holds the base folder's weights), remembering that base."""
    return apply_lora(model, with_base(spec, model, os.path.abspath(base)))
