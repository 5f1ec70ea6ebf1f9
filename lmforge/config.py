"""Every option of the model family and of training, in two dataclasses.

A model folder's `config.json` is `ModelConfig.to_dict()`; a run's `train_config.json` is
`TrainConfig.to_dict()`. Config files given on the command line (YAML or JSON) use the same
field names as these dataclasses and as the CLI flags (with `-` or `_`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.errors import LmforgeError

TRANSFORMER_ARCHS = ("decoder", "encoder", "encoder-decoder")
ARCHS = (*TRANSFORMER_ARCHS, "lstm")  # lstm: the recurrent seq2seq baseline (model/lstm.py)
POSITIONS = ("learned", "sinusoidal", "relative", "rope", "alibi", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")  # silu: x*sigmoid(x), Marian's "swish"
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POOLINGS = ("cls", "mean", "last")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise LmforgeError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class ModelConfig:
    """The shape of one Transformer: decoder (GPT), encoder (BERT) or encoder-decoder."""

    arch: str = "decoder"
    vocab_size: int = 256
    block_size: int = 256  # longest sequence the position scheme must cover
    n_layer: int = 4  # encoder layers for encoder-decoder, otherwise the only stack
    n_decoder_layer: int | None = None  # encoder-decoder only; defaults to n_layer
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain MHA)
    n_embd: int = 128
    d_ff: int | None = None  # feed-forward width; None means 4*n_embd (8/3*n_embd for swiglu)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    position: str = "rope"  # beat learned positions by 0.10 nats on char-level Shakespeare (docs/notes.md)
    rope_theta: float = 10000.0
    relative_distance: int = 16  # Shaw et al.: distances are clipped to [-k, k]
    bias: bool = True  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = True
    dense_connections: bool = False  # each layer reads a projection of all earlier outputs
    type_vocab_size: int = 0  # segment embeddings (BERT uses 2)
    embedding_norm: bool = False  # normalise embeddings before the first layer (BERT)
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option: scores / (layer index + 1)
    scale_embedding: bool = False  # token vectors times sqrt(n_embd) before positions are added (BART option)
    lm_head_bias: bool = False  # a bias on the next-token logits (BART's final_logits_bias)
    sinusoidal_halves: bool = False  # sinusoidal: all sines, then all cosines (Marian), not interleaved pairs
    decoder_vocab_size: int | None = None  # encoder-decoder: the target side's own vocabulary and token table
    n_labels: int | None = None  # classify whole sequences into n labels instead of predicting tokens
    pooling: str | None = None  # the sequence's vector for classification: cls, mean or last (None: the family's)
    span_head: bool = False  # extractive QA: a start and an end logit per token instead of token predictions
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    mask_token_id: int | None = None
    decoder_start_token_id: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation == "swiglu":  # keeps parameters equal to a 4x GELU MLP
            return int(8 * self.n_embd / 3 + 63) // 64 * 64
        return 4 * self.n_embd

    @property
    def pooling_mode(self) -> str:
        """BERT classifies from [CLS], GPT-2 from the last real token: each family's own default."""
        return self.pooling or ("cls" if self.arch == "encoder" else "last")

    @property
    def task_head(self) -> bool:
        """A head of its own task (labels, QA spans) in place of the token head: it starts fresh, and
        trains beside LoRA adapters."""
        return bool(self.n_labels or self.span_head)

    @property
    def target_vocab_size(self) -> int:
        """The vocabulary the LM head predicts: the decoder's own, when it has one."""
        return self.decoder_vocab_size or self.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer

    @property
    def causal(self) -> bool:
        return self.arch != "encoder"

    def validate(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise LmforgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise LmforgeError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise LmforgeError(f"rope needs an even head dimension; got {self.head_dim}")
        if self.decoder_vocab_size is not None and (self.arch != "encoder-decoder" or self.decoder_vocab_size < 1):
            raise LmforgeError(f"decoder_vocab_size (a target vocabulary of its own) needs arch encoder-decoder "
                               f"and at least 1 token; got {self.decoder_vocab_size} for {self.arch!r}")
        if self.position == "sinusoidal" and self.n_embd % 2:
            raise LmforgeError(f"sinusoidal positions need an even n_embd; got {self.n_embd}")
        if self.n_labels is not None:
            if self.arch == "encoder-decoder":
                raise LmforgeError("n_labels (a sequence classifier) needs arch encoder or decoder; "
                                   "got 'encoder-decoder'")
            if self.n_labels < 2:
                raise LmforgeError(f"n_labels must be at least 2; got {self.n_labels}")
        if self.span_head and (self.n_labels or self.arch == "encoder-decoder"):
            raise LmforgeError("span_head (extractive QA) needs an encoder or a decoder without n_labels")
        if self.pooling is not None:
            _check_choice("pooling", self.pooling, POOLINGS)
            if self.pooling == "cls" and self.arch != "encoder":
                raise LmforgeError("pooling cls needs an encoder: a decoder's first token sees nothing after it")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LmforgeError(f"{name} must be in [0, 1); got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**_known_fields(cls, data, "model config"))

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_file(path))


@dataclass
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and checkpointing."""

    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # floor of the cosine decay; None means lr / 10
    warmup_steps: int = 100
    max_steps: int = 2000
    seq_len: int | None = None  # tokens per training window; None means the model's block_size
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    compile: bool = False  # costs ~50 s of compiling on a CPU; pays only in long runs
    bf16: bool | None = None  # None: on where the hardware has bf16 matrix units (hardware.bf16_native)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    early_stopping_patience: int = 0  # stop after this many evaluations without a better one; keep the best (0: off)
    label_smoothing: float = 0.0  # task fine-tuning: part of each target's probability spread over all labels
    l1_penalty: float = 0.0  # adds this times the sum of |w| over the decayed matrices to the loss
    augment: str | None = None  # classification: "delete" or "swap" random tokens of training inputs
    augment_prob: float = 0.1  # the share of a text's tokens that augmentation deletes or swaps
    objective: str = "clm"  # clm, mlm, denoise or span (T5); chosen from the arch when not given
    mask_prob: float = 0.15
    whole_word_mask: bool = False  # mlm: choose whole words (all their tokens together), not single tokens
    val_fraction: float = 0.1
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise LmforgeError(f"seq_len must be at least 2; got {self.seq_len}")
        if self.lr <= 0:
            raise LmforgeError(f"lr must be positive; got {self.lr}")
        for name in ("label_smoothing", "augment_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LmforgeError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.l1_penalty < 0:
            raise LmforgeError(f"l1_penalty must be >= 0; got {self.l1_penalty}")
        if self.augment is not None:
            _check_choice("augment", self.augment, ("delete", "swap"))
        if self.early_stopping_patience < 0:
            raise LmforgeError(f"early_stopping_patience must be >= 0; got {self.early_stopping_patience}")
        if self.warmup_steps < 0:
            raise LmforgeError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LmforgeError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        if not 0.0 < self.mask_prob < 1.0:
            raise LmforgeError(f"mask_prob must be in (0, 1); got {self.mask_prob}")
        _check_choice("objective", self.objective, ("clm", "mlm", "denoise", "span"))
        if self.whole_word_mask and self.objective != "mlm":
            raise LmforgeError(f"whole_word_mask applies to masked LM (objective mlm, an encoder's); "
                               f"this run's objective is {self.objective}")

    @property
    def lr_floor(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**_known_fields(cls, data, "train config"))


def _known_fields(cls, data: dict, what: str) -> dict:
    names = {f.name for f in fields(cls)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise LmforgeError(f"unknown {what} field(s): {', '.join(unknown)}")
    return data


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON mapping; any problem becomes a one-line LmforgeError."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError
        raise LmforgeError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"config file {path} must hold a mapping of option names to values")
    return data
