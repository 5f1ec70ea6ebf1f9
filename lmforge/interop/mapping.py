"""What every family shares: a weight map that runs both ways, and config checks that name the field.

A family lists its weights once, as `Param`s (our name, the Hugging Face name(s), a `Rule`), and
the same list drives import (`weights_from_hf`) and export (`weights_to_hf`), so the two
directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Rule:
    """How one of our tensors is made from its HF piece(s), and back."""

    to_ours: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor, int], list[torch.Tensor]]  # (tensor, number of HF pieces)


COPY = Rule(lambda parts: parts[0], lambda t, n: [t])
TRANSPOSE = Rule(lambda parts: parts[0].t(), lambda t, n: [t.t()])  # GPT-2's Conv1D stores (in, out)
CONCAT = Rule(lambda parts: torch.cat(parts), lambda t, n: list(t.chunk(n)))  # separate q, k, v -> fused
ROW = Rule(lambda parts: parts[0].reshape(-1), lambda t, n: [t.reshape(1, -1)])  # BART's (1, vocab) bias


def skip_rows(k: int) -> Rule:
    """A table whose first k rows are never read (BART positions start at 2); exported as zeros."""
    return Rule(lambda parts: parts[0][k:], lambda t, n: [torch.cat([t.new_zeros(k, t.shape[1]), t])])


@dataclass(frozen=True)
class Param:
    ours: str
    hf: tuple[str, ...]
    rule: Rule = COPY
    optional: bool = False  # may be absent from a checkpoint: the model keeps its zero init, as transformers does


def linear(ours: str, hf: str | list[str], rule: Rule = COPY) -> Iterator[Param]:
    """Weight and bias of a linear layer (or LayerNorm); a list of HF layers is fused in order."""
    names = [hf] if isinstance(hf, str) else hf
    rule = CONCAT if len(names) > 1 else rule
    for part in ("weight", "bias"):
        yield Param(f"{ours}.{part}", tuple(f"{n}.{part}" for n in names), rule)


@dataclass(frozen=True)
class BlockNames:
    """HF names of one block's parts, relative to the layer prefix. qkv has one fused name or three."""

    qkv: tuple[str, ...]
    attn_out: str
    attn_norm: str
    up: str
    down: str
    ffn_norm: str
    cross_qkv: tuple[str, str, str] | None = None
    cross_out: str | None = None
    cross_norm: str | None = None


def block_params(ours: str, hf: str, names: BlockNames, rule: Rule = COPY) -> Iterator[Param]:
    """Our Block at `ours` against the HF layer at `hf`; `rule` applies to unfused linear layers."""
    yield from linear(f"{ours}.attn.qkv", [f"{hf}.{n}" for n in names.qkv], rule)
    yield from linear(f"{ours}.attn.proj", f"{hf}.{names.attn_out}", rule)
    yield from linear(f"{ours}.attn_norm", f"{hf}.{names.attn_norm}")
    if names.cross_qkv is not None:
        q, k, v = (f"{hf}.{n}" for n in names.cross_qkv)
        yield from linear(f"{ours}.cross_attn.q", q, rule)
        yield from linear(f"{ours}.cross_attn.kv", [k, v])
        yield from linear(f"{ours}.cross_attn.proj", f"{hf}.{names.cross_out}", rule)
        yield from linear(f"{ours}.cross_norm", f"{hf}.{names.cross_norm}")
    yield from linear(f"{ours}.ffn.up", f"{hf}.{names.up}", rule)
    yield from linear(f"{ours}.ffn.down", f"{hf}.{names.down}", rule)
    yield from linear(f"{ours}.ffn_norm", f"{hf}.{names.ffn_norm}")


def _candidates(name: str) -> Iterator[str]:
    """Spellings older checkpoints use: without the base-model prefix (the original `gpt2` has
    `h.0...` for `transformer.h.0...`), and TF-era LayerNorm `gamma`/`beta`."""
    stems = [name, name.split(".", 1)[1]] if "." in name else [name]
    for stem in stems:
        yield stem
        if stem.endswith(".weight"):
            yield stem[: -len("weight")] + "gamma"
        elif stem.endswith(".bias"):
            yield stem[: -len("bias")] + "beta"


def _lookup(state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return next((state[c] for c in _candidates(name) if c in state), None)


def weights_from_hf(params: Iterable[Param], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from an HF one. Weights we do not need (a pooler an MLM model never uses,
    old attention-mask buffers) are ignored, as `from_pretrained` ignores them."""
    ours: dict[str, torch.Tensor] = {}
    for param in params:
        parts = [_lookup(state, name) for name in param.hf]
        if any(p is None for p in parts):
            if param.optional:
                continue
            missing = [name for name, p in zip(param.hf, parts, strict=True) if p is None]
            raise LmforgeError(f"the checkpoint has no weight {missing[0]} (needed for {param.ours})")
        ours[param.ours] = param.rule.to_ours(parts)
    return ours


def weights_to_hf(params: Iterable[Param], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF state dict from ours: contiguous, and no two entries sharing memory (safetensors refuses that)."""
    hf: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for param in params:
        for name, tensor in zip(param.hf, param.rule.to_hf(state[param.ours], len(param.hf)), strict=True):
            tensor = tensor.detach().contiguous()
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            hf[name] = tensor
    return hf


# ---------------------------------------------------------------- configs

# What GPT-2, BERT and BART all are, stated once: LayerNorm, learned absolute positions, biases.
# Spelled out on import because lmforge's own defaults differ (rotary positions).
CLASSIC_LAYOUT = {"norm": "layernorm", "position": "learned", "bias": True}

ACTIVATIONS_FROM_HF = {  # transformers' ACT2FN names -> ours; the tanh forms agree to ~1e-10
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


class HFConfig:
    """An HF config.json with the family's defaults filled in (saved configs may omit them);
    every refusal names the field and its value."""

    def __init__(self, data: dict, defaults: dict, model_type: str):
        self.data = {**defaults, **data}
        self.model_type = model_type

    def __getitem__(self, name: str) -> Any:
        return self.data.get(name)

    def refuse(self, name: str, why: str) -> LmforgeError:
        return LmforgeError(f"{self.model_type} config: {name}={self[name]!r} is not supported ({why})")

    def expect(self, name: str, *allowed: Any) -> Any:
        if self[name] not in allowed:
            raise self.refuse(name, f"lmforge handles {' or '.join(map(repr, allowed))}")
        return self[name]

    def same(self, name: str, other: str) -> Any:
        """Fields the core has only one of (heads, FFN width) must agree between encoder and decoder."""
        if self[name] != self[other]:
            raise self.refuse(name, f"it must equal {other}={self[other]!r}")
        return self[name]

    def activation(self, name: str) -> str:
        if self[name] not in ACTIVATIONS_FROM_HF:
            raise self.refuse(name, f"lmforge handles {', '.join(ACTIVATIONS_FROM_HF)}")
        return ACTIVATIONS_FROM_HF[self[name]]


def classifier_labels(hf: HFConfig) -> int:
    """The label count of a `...ForSequenceClassification`. Only single-label classification: a
    regression or multi-label head is scored differently (no softmax, another loss)."""
    hf.expect("problem_type", None, "single_label_classification")
    n_labels = len(hf["id2label"]) if hf["id2label"] else hf["num_labels"]
    if n_labels < 2:
        raise hf.refuse("num_labels", "regression (one label) is not supported; lmforge classifies")
    return n_labels


def label_fields(labels: list[str]) -> dict:
    """config.json's id2label and label2id: what transformers' pipeline names its predictions by."""
    return {"id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def require(config: ModelConfig, target: str, **allowed: tuple) -> None:
    """Export check: each named field of our config must hold one of the values `target` can express."""
    for name, values in allowed.items():
        value = getattr(config, name)
        if value not in values:
            raise LmforgeError(
                f"cannot export to {target}: {name}={value!r} has no {target} equivalent "
                f"(it needs {' or '.join(map(repr, values))})"
            )


def activation_to_hf(config: ModelConfig, target: str) -> str:
    require(config, target, activation=tuple(ACTIVATIONS_TO_HF))
    return ACTIVATIONS_TO_HF[config.activation]


def plain_attention(config: ModelConfig) -> tuple:
    """Allowed n_kv_head values when the target has plain multi-head attention."""
    return (None, config.n_head)


@dataclass(frozen=True)
class Family:
    """One Hugging Face model type: its architectures, config both ways, and its weight map."""

    model_type: str
    architectures: tuple[str, ...]  # the first is assumed when config.json names none
    defaults: dict  # transformers' defaults for every field config_from_hf reads
    config_from_hf: Callable[[HFConfig, str], dict]  # (config, architecture) -> ModelConfig fields
    config_to_hf: Callable[[ModelConfig], dict]  # also checks the config can be expressed
    params: Callable[[ModelConfig], Iterator[Param]]
    generative: bool  # writes generation_config.json
