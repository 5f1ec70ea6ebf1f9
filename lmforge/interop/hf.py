"""Hugging Face model folders in and out: config.json, weights, tokenizer, generation_config.json.

Reading needs no `transformers` (config.json is JSON; weights are safetensors or a torch pickle
read with weights_only=True), and neither does writing: the exported folder is plain files that
`from_pretrained` loads. So `transformers` stays a test-only dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop import bart, bert, gpt2, marian
from lmforge.interop.mapping import Family, HFConfig, label_fields, require, weights_from_hf, weights_to_hf
from lmforge.tokenize import Tokenizer

FAMILIES: dict[str, Family] = {f.model_type: f for f in (gpt2.FAMILY, bert.FAMILY, bart.FAMILY, marian.FAMILY)}
EXPORT_FAMILY = {"decoder": gpt2.FAMILY, "encoder": bert.FAMILY, "encoder-decoder": bart.FAMILY}
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLASSIFIER_POOLING = {"encoder": "cls", "decoder": "last"}  # BERT's pooler reads [CLS]; GPT-2's score the last token


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return data


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names a Hugging Face model_type or architectures (lmforge's
    own config.json has neither)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def hf_task(folder: str | Path) -> dict | None:
    """The task a Hugging Face folder was trained for, in lmforge's task.json terms: its
    `...ForSequenceClassification` labels (id2label), or extractive QA (`...ForQuestionAnswering`),
    read through the tokenizer's own template."""
    data = _read_json(Path(folder) / "config.json")
    architecture = (data.get("architectures") or [""])[0]
    if architecture.endswith("ForQuestionAnswering"):
        return {"task": "qa", "template": "tokenizer"}
    if not architecture.endswith("ForSequenceClassification"):
        return None
    id2label = data.get("id2label") or {}
    count = len(id2label) or int(data.get("num_labels", 2))
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]
    return {"task": "classify", "labels": labels, "template": "tokenizer"}


# ---------------------------------------------------------------- reading


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many kinds; any of them means a bad file
        raise LmforgeError(f"cannot read weights {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or pytorch_model.bin, or of their shards (an .index.json)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _load_weight_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return {k: v for shard in shards for k, v in _load_weight_file(folder / shard).items()}
    raise LmforgeError(f"{folder} has no weights: expected {' or '.join(WEIGHT_FILES)}")


def _family(data: dict, folder: Path) -> tuple[Family, str]:
    model_type = data.get("model_type")
    if model_type is None:  # some old configs name only the architecture
        named = set(data.get("architectures") or ())
        model_type = next((f.model_type for f in FAMILIES.values() if named & set(f.architectures)), None)
    if model_type not in FAMILIES:
        raise LmforgeError(
            f"{folder / 'config.json'}: model_type={model_type!r} is not supported "
            f"(lmforge converts {', '.join(sorted(FAMILIES))})"
        )
    family = FAMILIES[model_type]
    architectures = data.get("architectures") or [family.architectures[0]]
    if architectures[0] not in family.architectures:
        raise LmforgeError(
            f"{model_type} config: architectures={architectures!r} is not supported "
            f"(lmforge converts {', '.join(family.architectures)})"
        )
    return family, architectures[0]


def _token_ids(hf: HFConfig, generation: dict, tokenizer: Tokenizer) -> dict:
    """Special ids from config.json, overridden by generation_config.json (what `generate` uses).
    The mask id lives only in the tokenizer."""
    ids = {}
    for name in TOKEN_FIELDS:
        value = generation.get(name, hf[name])
        ids[name] = value[0] if isinstance(value, list) and value else value
    ids["mask_token_id"] = tokenizer.mask_id
    return ids


def _unmapped(model, params: list) -> list[str]:
    """Our weights that no Param covers; a tied head is the token table and needs none."""
    covered = {p.ours for p in params}
    tied = "head.proj.weight" if model.config.tie_embeddings else None
    return sorted(k for k in model.state_dict() if k != tied and k not in covered)


def from_hf(hf_dir: str | Path):
    """(model, tokenizer) from a Hugging Face folder, converted in memory. The model is a
    LanguageModel, or a SequenceClassifier for Bert- and GPT2ForSequenceClassification."""
    from lmforge.model import build_model

    folder = Path(hf_dir)
    if not folder.is_dir():
        raise LmforgeError(f"model folder not found: {folder}")
    data = _read_json(folder / "config.json")
    family, architecture = _family(data, folder)
    hf = HFConfig(data, family.defaults, family.model_type)
    options = family.config_from_hf(hf, architecture)
    tokenizer = Tokenizer.load(folder)  # Marian's source.spm/target.spm load through lmforge/spm.py
    generation = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    config = ModelConfig(**options, **_token_ids(hf, generation, tokenizer))
    if tokenizer.vocab_size > config.vocab_size:
        raise LmforgeError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {config.vocab_size}"
        )
    params = list(family.params(config))
    model = build_model(config)
    unmapped = _unmapped(model, params)
    assert not unmapped, f"{family.model_type} mapping misses {unmapped}"  # a bug here, not in the folder
    state = weights_from_hf(params, read_hf_weights(folder))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: the weights do not fit config.json
        raise LmforgeError(f"{folder}: weights do not match config.json: {str(exc).splitlines()[-1].strip()}") from None
    model.tie_weights()
    return model.eval(), tokenizer


# ---------------------------------------------------------------- writing


def _tokenizer_config(tokenizer: Tokenizer, config: ModelConfig) -> dict:
    """Just enough for `AutoTokenizer.from_pretrained` to load tokenizer.json and know its roles.
    model_input_names is spelled out: without it transformers 5 drops BERT's segment ids (a pair
    would read as one segment) and transformers 4 hands GPT-2 token_type_ids, which it embeds."""
    roles = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
             "unk": tokenizer.unk_id, "mask": tokenizer.mask_id}
    segments = ["token_type_ids"] if config.type_vocab_size else []
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
           "model_input_names": ["input_ids", *segments, "attention_mask"]}
    out.update({f"{role}_token": tokenizer.id_to_token(i) for role, i in roles.items() if i is not None})
    return out


def _label_names(config: ModelConfig, task: dict | None) -> list[str]:
    """The classifier's label names from task.json, else transformers' own LABEL_i."""
    labels = [str(name) for name in (task or {}).get("labels") or []]
    if labels and len(labels) != config.n_labels:
        raise LmforgeError(f"task.json names {len(labels)} labels but the model has {config.n_labels}")
    return labels or [f"LABEL_{i}" for i in range(config.n_labels)]


def _with_lmforge_template(tokenizer: Tokenizer, config: ModelConfig) -> Tokenizer:
    """A copy of the tokenizer whose post-processor builds inputs as classify.py's "lmforge" template
    does (`[start] a <eos> [b <eos>]`), so transformers feeds the exported classifier what it was trained on."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    eos = tokenizer.eos_id
    if eos is None:
        raise LmforgeError("cannot export the classifier's input template: the tokenizer has no end-of-text token")
    if config.arch == "decoder" and config.pad_token_id == eos:
        raise LmforgeError(f"cannot export to gpt2: pad_token_id={eos} is the end-of-text token every input ends "
                           "with, and GPT-2's classifier reads the last token that is not pad_token_id")
    start = [tokenizer.bos_id if tokenizer.bos_id is not None else eos] if config.arch == "encoder" else []
    # "name:type" pieces; the type is always given, so a ':' inside a token's name stays part of it
    single = [*(f"{tokenizer.id_to_token(i)}:0" for i in start), "$A:0", f"{tokenizer.id_to_token(eos)}:0"]
    pair = [*single, "$B:1", f"{tokenizer.id_to_token(eos)}:1"]
    specials = [(tokenizer.id_to_token(i), i) for i in dict.fromkeys([*start, eos])]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    inner = RustTokenizer.from_str(tokenizer.to_json())
    kept = inner.post_processor  # e.g. byte-level offset trimming: adds no tokens, so it stays first
    inner.post_processor = template if kept is None else processors.Sequence([kept, template])
    return Tokenizer(inner)


def to_hf(model, tokenizer: Tokenizer | None, out_dir: str | Path, task: dict | None = None) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face folder: config.json, model.safetensors,
    generation_config.json for generative families, tokenizer.json + tokenizer_config.json. A
    classifier's label names (task.json) become its id2label, and lmforge's own input template
    becomes the tokenizer's post-processor."""
    from safetensors.torch import save

    config = model.config
    family = EXPORT_FAMILY[config.arch]
    if config.arch == "encoder-decoder" and config.position == "sinusoidal":
        family = marian.FAMILY  # BART's positions are learned, Marian's sinusoidal
    hf_config = {"model_type": family.model_type, **family.config_to_hf(config), "dtype": "float32"}
    token_ids = {name: getattr(config, name) for name in TOKEN_FIELDS}
    if config.arch == "encoder-decoder":  # lmforge falls back to bos, then eos; transformers needs it spelled out
        starts = (config.decoder_start_token_id, config.bos_token_id, config.eos_token_id)
        token_ids["decoder_start_token_id"] = next((i for i in starts if i is not None), None)
    else:
        token_ids.pop("decoder_start_token_id")
    hf_config.update(token_ids)
    if config.n_labels:
        require(config, family.model_type, pooling=(None, CLASSIFIER_POOLING[config.arch]))
        hf_config.update(label_fields(_label_names(config, task)))
    if (config.n_labels or config.span_head) and tokenizer is not None and (task or {}).get("template") == "lmforge":
        tokenizer = _with_lmforge_template(tokenizer, config)
    params = list(family.params(config))
    unmapped = _unmapped(model, params)
    if unmapped:
        raise LmforgeError(f"cannot export to {family.model_type}: no place for {unmapped[0]}")
    weights = weights_to_hf(params, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "model.safetensors", save(weights, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if family.generative:
        generation = {k: v for k, v in token_ids.items() if v is not None}
        atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):  # SentencePiece (Marian): its own files and class
        tokenizer.save_hf(out)
    elif tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
        tokenizer_config = _tokenizer_config(tokenizer, config)
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    return out
