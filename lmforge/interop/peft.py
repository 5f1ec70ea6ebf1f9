"""A LoRA adapter folder out as PEFT's format: adapter_config.json + adapter_model.safetensors,
beside the Hugging Face export of its base (to_hf), so that

    PeftModel.from_pretrained(AutoModelFor...from_pretrained(out), out)

computes what the adapted lmforge model does. Like the rest of interop/, nothing here imports
`peft` or `transformers`: the files are written from their documented layout.

PEFT puts one (A, B) pair on each Hugging Face module, scaled by lora_alpha / r. BERT's and
BART's q, k and v are separate modules, so each of our slices becomes one pair as it is. GPT-2's
`c_attn` is one module for q, k and v together: LoRA on q and v there is not a rank-r LoRA of
`c_attn`, but it is exactly a rank-(2r) one, with the slices' A matrices stacked and their B
matrices placed block-diagonally (zero outside each slice's rows), which is how LoraLinear
computes it anyway (stacked_A, spread_B). Its rank and alpha are both multiplied by the number
of slices (rank_pattern, alpha_pattern), which keeps the scale alpha / r the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.errors import LmforgeError
from lmforge.interop.hf import EXPORT_FAMILY, to_hf
from lmforge.interop.mapping import TRANSPOSE

PREFIX = "base_model.model."  # PeftModel's name for the wrapped model, in every saved key
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM", "encoder": None}


def _hf_pieces(name: str, layer, hf_names: tuple[str, ...]):
    """(HF module, A, B, rank multiplier) for one adapted layer of ours."""
    modules = [n.removesuffix(".weight") for n in hf_names]
    if len(modules) == 1:  # one HF module (maybe fused): one pair of rank n·r
        yield modules[0], layer.stacked_A(), layer.spread_B(), len(layer.slices)
        return
    width = layer.out_features // len(modules)  # our fused layer is the HF modules' outputs, in order
    for target, (start, stop) in layer.slices.items():
        index = start // width
        if (start, stop) != (index * width, (index + 1) * width):
            raise LmforgeError(f"cannot export {name}'s {target} adapter: it spans parts of several HF modules")
        yield modules[index], layer.lora_A[target], layer.lora_B[target], 1


def to_peft(model, tokenizer, out_dir: str | Path, task: dict | None = None) -> Path:
    """Write the base (with a classifier's trained head) as a Hugging Face folder and the adapters
    in PEFT's format beside it. Strips the adapters from `model` (it becomes the base)."""
    from safetensors.torch import save

    from lmforge.finetune.lora import adapter_layers, merge

    spec, config = model.lora, model.config
    if spec.prompt_tokens:
        raise LmforgeError("cannot export a soft prompt (prompt tuning) to PEFT's format yet; only LoRA adapters")
    params = {p.ours: p for p in EXPORT_FAMILY[config.arch].params(config)}
    tensors, ranks, alphas, targets, transposed = {}, {}, {}, [], set()
    for name, layer in adapter_layers(model).items():
        param = params.get(f"{name}.weight")
        if param is None:
            raise LmforgeError(f"cannot export to PEFT: {name} has no Hugging Face module")
        transposed.add(param.rule is TRANSPOSE)
        for module, a, b, times in _hf_pieces(name, layer, param.hf):
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().float().contiguous()
            targets.append(module)
            if times > 1:
                ranks[module], alphas[module] = spec.rank * times, spec.alpha * times
    head = sorted({n.rsplit(".", 1)[0] for p in params.values() if p.ours.startswith("head.") for n in p.hf}
                  if config.task_head else ())
    state = model.state_dict()
    for p in params.values():  # a classifier's trained head: PEFT's modules_to_save, saved under their own names
        if config.task_head and p.ours.startswith("head."):
            tensors.update({PREFIX + n: t for n, t in zip(p.hf, p.rule.to_hf(state[p.ours], len(p.hf)), strict=True)})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if config.n_labels else "QUESTION_ANS" if config.span_head else TASK_TYPES[config.arch],
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": transposed == {True},  # GPT-2's Conv1D stores weights (in, out)
        "modules_to_save": head or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    merge(model, fold=False)
    out = to_hf(model, tokenizer, out_dir, task=task)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_text(out / "adapter_config.json", json.dumps(adapter_config, indent=2) + "\n")
    return out
