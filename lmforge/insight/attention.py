"""Attention maps and the logit lens of one text.

Attention probabilities come from the model itself: each Attention module computes them by an
explicit softmax while its `record` list is set (model/attention.py), so the maps are the
weights the forward pass used, for every family and position scheme. The logit lens sends each
layer's output through the stack's final norm and the LM head: the tokens each layer would
already predict.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.atomic import atomic_write_text
from lmforge.errors import LmforgeError
from lmforge.insight.figures import pyplot, save_png


@dataclass
class AttentionMap:
    name: str  # "decoder layer 2 self-attention"
    probs: np.ndarray  # (heads, queries, keys)
    queries: list[str]
    keys: list[str]


def visible(text: str) -> str:
    """Newlines, tabs and other control characters as escapes (fonts have no glyph for them)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token as text a reader can see (spaces as middle dots, control characters escaped)."""
    return [visible(tokenizer.decode([i], skip_special_tokens=False).replace(" ", "·")) or f"[{i}]" for i in ids]


@contextmanager
def recording(model):
    """Every attention module keeps its probabilities while inside."""
    from lmforge.model.attention import Attention

    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for m in modules:
        m.record = []
    try:
        yield modules
    finally:
        for m in modules:
            m.record = None


def _inputs(model, tokenizer, text: str, target: str | None) -> tuple[list[int], list[int] | None]:
    config = model.config
    ids = tokenizer.encode(text)[:config.block_size]
    if not ids:
        raise LmforgeError("--text has no tokens")
    if config.arch not in ("decoder", "encoder", "encoder-decoder"):
        raise LmforgeError(f"attention maps need a Transformer; this model is a {config.arch}")
    if config.arch != "encoder-decoder":
        return ids, None
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else tokenizer.eos_id
    return ids, ([start] + tokenizer.encode(target if target is not None else text))[:config.block_size]


def _forward(model, ids: list[int], decoder_ids: list[int] | None) -> None:
    if decoder_ids is None:
        model(torch.tensor([ids]))
    else:
        model(torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids]))


@torch.no_grad()
def attention_maps(model, tokenizer, text: str, target: str | None = None) -> list[AttentionMap]:
    """Every layer's self-attention (and an encoder-decoder's cross-attention), for one text;
    an encoder-decoder reads `text` and is fed `target` (default: the text again)."""
    model.eval()
    ids, decoder_ids = _inputs(model, tokenizer, text, target)
    with recording(model):
        _forward(model, ids, decoder_ids)
        maps = []
        for stack_name, stack, own in (("encoder", model.encoder, ids), ("decoder", model.decoder, decoder_ids or ids)):
            if stack is None:
                continue
            for layer, block in enumerate(stack.blocks, 1):
                labels, keys = token_labels(tokenizer, own), token_labels(tokenizer, ids)
                maps.append(AttentionMap(f"{stack_name} layer {layer} self-attention",
                                         block.attn.record[0][0].numpy(), labels, labels))
                if block.cross_attn is not None:
                    maps.append(AttentionMap(f"{stack_name} layer {layer} cross-attention",
                                             block.cross_attn.record[0][0].numpy(), labels, keys))
    return maps


def plot_attention(found: AttentionMap, path: Path) -> Path:
    """One PNG: the heads as a grid of heatmaps, keys across, queries down."""
    plt = pyplot()
    heads, n_q, n_k = found.probs.shape
    cols = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / cols)
    cell = max(2.5, 0.22 * max(n_q, n_k))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1, cell * rows + 1), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= heads:
            ax.axis("off")
            continue
        ax.imshow(found.probs[index], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"head {index + 1}", fontsize=9)
        ax.set_xticks(range(n_k), found.keys, rotation=90, fontsize=7)
        ax.set_yticks(range(n_q), found.queries, fontsize=7)
    fig.suptitle(found.name)
    fig.tight_layout()
    return save_png(fig, path)


def write_attention(model, tokenizer, text: str, out_dir, target: str | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_attention(m, out / (m.name.replace(" ", "_").replace("-attention", "") + ".png"))
            for m in attention_maps(model, tokenizer, text, target)]


@torch.no_grad()
def logit_lens(model, tokenizer, text: str, top_k: int = 5, target: str | None = None) -> dict:
    """For each layer of the stack the head reads, and each position: the top_k tokens its
    output predicts through the final norm and head, with their probabilities."""
    if top_k < 1:
        raise LmforgeError(f"--top-k must be at least 1; got {top_k}")
    model.eval()
    ids, decoder_ids = _inputs(model, tokenizer, text, target)
    stack = model.decoder if model.decoder is not None else model.encoder
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in stack.blocks]
    try:
        _forward(model, ids, decoder_ids)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for layer, hidden in enumerate(outputs, 1):
        probs = torch.softmax(model.head(stack.final_norm(hidden))[0].float(), dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        layers.append({"layer": layer, "positions": [
            [{"token": tokenizer.decode([int(i)], skip_special_tokens=False), "id": int(i), "prob": float(p)}
             for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values, top.indices, strict=True)]})
    own = decoder_ids or ids
    return {"text": text, "tokens": [tokenizer.decode([i], skip_special_tokens=False) for i in own],
            "layers": layers}


def plot_lens(lens: dict, path: Path) -> Path:
    """The top token of every layer (rows, last layer on top) at every position (columns),
    coloured by its probability."""
    plt = pyplot()
    layers = lens["layers"][::-1]
    probs = np.array([[pos[0]["prob"] for pos in layer["positions"]] for layer in layers])
    n_layers, n_pos = probs.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_pos, 1.0 + 0.45 * n_layers))
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for row, layer in enumerate(layers):
        for col, pos in enumerate(layer["positions"]):
            shown = visible(pos[0]["token"])
            ax.text(col, row, shown, ha="center", va="center", fontsize=7,
                    color="white" if probs[row, col] > 0.6 else "black")
    ax.set_xticks(range(n_pos), [visible(t) for t in lens["tokens"]], rotation=90, fontsize=7)
    ax.set_yticks(range(n_layers), [f"layer {layer['layer']}" for layer in layers], fontsize=8)
    ax.set_xlabel("input token (each column: the next token predicted after it)")
    ax.set_title("logit lens: top token per layer")
    fig.tight_layout()
    return save_png(fig, path)


def write_lens(model, tokenizer, text: str, out_dir, top_k: int = 5, target: str | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lens = logit_lens(model, tokenizer, text, top_k, target)
    atomic_write_text(out / "lens.json", json.dumps(lens, indent=2, ensure_ascii=False) + "\n")
    return [out / "lens.json", plot_lens(lens, out / "lens.png")]
