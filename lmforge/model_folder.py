"""Model folders: what every stage after training reads, in lmforge's format or Hugging Face's.

An lmforge model folder is `model.safetensors`, `config.json` and `tokenizer.json`, written
atomically, and `task.json` when it was fine-tuned for a task. A Hugging Face folder (GPT-2,
BERT, BART) is converted in memory as it loads, so every command that loads a model through
`load_model` accepts one directly. A LoRA run's folder is an adapter folder (`adapter.json`,
`adapter.safetensors`: only what trained); `load_model` loads its base and applies it. This module
sits below train/ (which writes model folders into its checkpoints) and above model/ and interop/.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.errors import LmforgeError
from lmforge.interop import from_hf, hf_task, is_hf_folder, to_hf

MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")
TASK_FILE = "task.json"  # only in fine-tuned folders
# A LoRA run's folder holds only what it trained (finetune/lora.py); adapter.json names the base.
ADAPTER_FILE, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
ADAPTER_FILES = (ADAPTER_FILE, ADAPTER_WEIGHTS, "config.json", "tokenizer.json")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def model_files(folder: str | Path) -> tuple[str, ...]:
    """The files that make `folder` a model (a plain one or an adapter), task.json included if there."""
    names = ADAPTER_FILES if is_adapter_folder(folder) else MODEL_FILES
    return names + ((TASK_FILE,) if (Path(folder) / TASK_FILE).is_file() else ())


def _stored(model, state: dict) -> dict:
    """The entries a model folder stores: no aliases (a tied head is the token table); of a model
    with LoRA adapters, only what trains (the adapters and a classifier's head)."""
    state = dict(state)
    if model.config.tie_embeddings:
        state.pop("head.proj.weight", None)
    if getattr(model, "lora", None) is not None:
        from lmforge.finetune.lora import is_adapter_weight

        state = {k: v for k, v in state.items() if is_adapter_weight(k, model.config)}
    return state


def model_state(model, state: dict | None = None) -> dict:
    """What a model folder stores of `model` (or of its gathered `state`), contiguous for safetensors."""
    stored = _stored(model, model.state_dict() if state is None else state)
    return {k: v.detach().contiguous() for k, v in stored.items()}


def stored_shapes(model) -> dict:
    """Name → shape of what a model folder (or checkpoint) of `model` holds."""
    return {k: v.shape for k, v in _stored(model, model.state_dict()).items()}


def save_model(model, folder: str | Path, tokenizer=None, metadata: dict | None = None, weights=None,
               task: dict | None = None, card: bool = True) -> None:
    """Write a model folder that `load_model` (and `lmforge generate/eval`) accept.

    `weights` replaces model.state_dict() when the caller already gathered it (FSDP); `task` is
    what a fine-tuned model is for (task.json, read back by `read_task`); `card` writes README.md,
    the model card (a checkpoint, which is not published as it is, goes without)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    lora = getattr(model, "lora", None)
    weights_file = ADAPTER_WEIGHTS if lora is not None else "model.safetensors"
    atomic_write_bytes(folder / weights_file, save(model_state(model, weights), metadata=meta))
    if lora is not None:
        from lmforge import __version__

        record = {"format": "lmforge-lora", **lora.to_dict(), "lmforge_version": __version__}
        atomic_write_text(folder / ADAPTER_FILE, json.dumps(record, indent=2) + "\n")
    model.config.save(folder / "config.json")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
    if task is not None:
        write_task(folder, task)
    if card:
        from lmforge.insight.card import write_card  # lazily: the card reads folders, it sits above this module

        write_card(folder)


def write_task(folder: str | Path, task: dict) -> None:
    """task.json: what a fine-tuned model is for (read back by `read_task`)."""
    atomic_write_text(Path(folder) / TASK_FILE, json.dumps(task, indent=2, ensure_ascii=False) + "\n")


def read_task(folder: str | Path) -> dict | None:
    """What a model folder was fine-tuned for ({"task": "classify", "labels": [...], ...}), or None
    for a plain language model. A Hugging Face folder says it through its architecture and labels."""
    folder = Path(folder)
    if is_hf_folder(folder):
        return hf_task(folder)
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmforgeError(f"cannot parse {path}: {exc}") from None
    if not isinstance(task, dict) or "task" not in task:
        raise LmforgeError(f"{path} must be a JSON object with a \"task\" field")
    return task


def load_model(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model folder; any missing or broken file is a one-line error.

    A Hugging Face model folder (GPT-2, BERT, BART) is converted in memory, so every command that
    loads a model through here accepts one directly."""
    from lmforge.config import ModelConfig
    from lmforge.model import build_model
    from lmforge.tokenize import Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"model folder not found: {folder}")
    if is_hf_folder(folder):
        model, tokenizer = from_hf(folder)
        return model.to(device).eval(), tokenizer
    if is_adapter_folder(folder):
        return _load_adapter(folder, device)
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise LmforgeError(f"{folder} is not a model folder: {name} is missing")
    config = ModelConfig.load(folder / "config.json")
    model = build_model(config)
    state = read_weights(folder, device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "head.proj.weight")]
    if missing or unexpected:
        raise LmforgeError(
            f"{folder / 'model.safetensors'} does not match config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    return model.to(device).eval(), Tokenizer.load(folder / "tokenizer.json")


def read_weights(folder: str | Path, device: str = "cpu") -> dict:
    """The tensors a model or adapter folder (or a checkpoint of either) stores."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / (ADAPTER_WEIGHTS if is_adapter_folder(folder) else "model.safetensors")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"cannot read {path}: {exc}") from None


def read_adapter(folder: str | Path):
    """The LoraSpec of an adapter folder's adapter.json."""
    from lmforge.finetune.lora import LoraSpec, parse_targets

    path = Path(folder) / ADAPTER_FILE
    try:
        spec = LoraSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(f"cannot read {path}: {type(exc).__name__} {exc}") from None
    if spec.rank:
        parse_targets(spec.targets)
    return spec


def adapted_model(config, spec):
    """`config`'s model on the weights of the adapter's base folder (a classifier's head aside: the
    adapter holds it), with fresh LoRA layers. A base that is gone, or whose weights are not the
    ones the adapter was trained on, is an error: the adapter would silently compute something else."""
    from lmforge.finetune.lora import apply_lora, base_fingerprint
    from lmforge.model import build_model

    base_dir = Path(spec.base)
    if not base_dir.is_dir():
        raise LmforgeError(f"the adapter's base model folder {base_dir} is missing (the adapter only holds what it "
                           "trained; restore that folder)")
    base, _ = load_model(base_dir)
    model = build_model(config)
    state = {k: v for k, v in base.state_dict().items() if not (config.task_head and k.startswith("head."))}
    changed = LmforgeError(f"the base model {base_dir} changed since the adapter was trained on it (its weights "
                           "differ); restore that base, or train the adapter again")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError:  # other shapes: a base of another size
        raise changed from None
    model.tie_weights()
    if base_fingerprint(model) != spec.base_fingerprint:
        raise changed
    return apply_lora(model, spec)


def _load_adapter(folder: Path, device: str):
    """(model, tokenizer) from a LoRA adapter folder: its base, plus its adapters and head."""
    from lmforge.config import ModelConfig
    from lmforge.tokenize import Tokenizer

    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise LmforgeError(f"{folder} is not an adapter folder: {name} is missing")
    model = adapted_model(ModelConfig.load(folder / "config.json"), read_adapter(folder))
    state = read_weights(folder)
    expected = model_state(model)
    if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
        raise LmforgeError(f"{folder / ADAPTER_WEIGHTS} does not match adapter.json and config.json")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), Tokenizer.load(folder / "tokenizer.json")


def _fresh_output(out_dir: str | Path, source: Path) -> Path:
    """Converting never mixes files into an existing folder (a stale pytorch_model.bin would win)."""
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise LmforgeError(f"--out must differ from the folder being converted ({source})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"--out {out} already exists and is not an empty folder")
    return out


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path):
    """An lmforge model folder from a Hugging Face one; returns the model."""
    out = _fresh_output(out_dir, Path(hf_dir))
    if not is_hf_folder(hf_dir):
        raise LmforgeError(f"{hf_dir} is not a Hugging Face model folder (no config.json with a model_type)")
    model, tokenizer = from_hf(hf_dir)
    save_model(model, out, tokenizer, task=hf_task(hf_dir))  # a classifier keeps its label names
    return model


def convert_to_hf(model_dir: str | Path, out_dir: str | Path):
    """A Hugging Face folder from an lmforge model folder; returns the model. A LoRA adapter folder
    becomes its base's Hugging Face folder with PEFT's adapter files beside it (interop/peft.py)."""
    out = _fresh_output(out_dir, Path(model_dir))
    model, tokenizer = load_model(model_dir)
    if getattr(model, "lora", None) is not None:
        from lmforge.interop.peft import to_peft

        to_peft(model, tokenizer, out, task=read_task(model_dir))
    else:
        to_hf(model, tokenizer, out, task=read_task(model_dir))
    from lmforge.insight.card import CARD, card_text

    atomic_write_text(out / CARD, card_text(model_dir, library="transformers"))  # the card, for transformers
    return model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path):
    """A plain model folder (task.json kept) whose weights are the base's with the adapters folded
    in: it computes what the adapter folder does, without needing the base. Returns the model."""
    from lmforge.finetune.lora import merge

    if not is_adapter_folder(adapter_dir):
        raise LmforgeError(f"{adapter_dir} is not a LoRA adapter folder (it has no {ADAPTER_FILE})")
    out = _fresh_output(out_dir, Path(adapter_dir))
    model, tokenizer = load_model(adapter_dir)
    if model.soft_prompt is not None:
        raise LmforgeError(f"{adapter_dir} holds a soft prompt (prompt tuning): an input, not a change of weights, "
                           "so it cannot be merged; use the adapter folder itself")
    save_model(merge(model), out, tokenizer, task=read_task(adapter_dir))
    return model
