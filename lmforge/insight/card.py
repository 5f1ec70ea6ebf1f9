"""The model card: README.md in every saved model folder, with the YAML block the Hugging Face Hub
reads (library, tags, pipeline, metrics), then what the model is, how it was trained, what it
scored, and what it is for and not for."""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.insight.runinfo import describe

CARD = "README.md"
PIPELINES = {"decoder": "text-generation", "encoder": "fill-mask", "encoder-decoder": "text2text-generation",
             "lstm": "text2text-generation", "classify": "text-classification", "qa": "question-answering",
             "translate": "translation", "summarize": "summarization", "instruct": "text-generation"}
USES = {
    "decoder": "continuing text in the style and domain of its training data",
    "encoder": "filling masked tokens, and as a base to fine-tune for classification or extractive QA",
    "encoder-decoder": "mapping one text to another (translation, summarisation) after fine-tuning",
    "classify": "labelling texts like those of its training data with its labels",
    "qa": "finding the answer span of a question in a given context",
}


def _yaml_list(key: str, items: list[str]) -> list[str]:
    return [f"{key}:", *(f"- {item}" for item in items)] if items else []


def card_text(folder, library: str = "lmforge") -> str:
    info = describe(folder)
    config, task = info["config"], info["task"].get("task")
    arch = config.get("arch", "unknown")
    tags = ["lmforge", arch, *([task] if task else [])]
    header = ["---", f"library_name: {library}", *_yaml_list("tags", tags),
              f"pipeline_tag: {PIPELINES.get(task or arch, 'text-generation')}"]
    metrics = info["final"]
    header += _yaml_list("metrics", sorted({k.split(" ", 1)[1] for k in metrics if k.startswith("val ")}))
    header.append("---")
    params = info["parameters"]
    size = f"{params / 1e6:.2f}M parameters" if params else "unknown size"
    article = "An" if arch[0] in "aeiou" else "A"
    lines = [*header, "", f"# {Path(folder).resolve().name}", "",
             f"{article} {arch} Transformer trained with lmforge{f' for {task}' if task else ''}: {size}.", "",
             "## Model", ""]
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "d_ff", "block_size", "position", "norm", "activation"):
        if config.get(key) is not None:
            lines.append(f"- {key}: {config[key]}")
    if info["tokenizer"]:
        lines.append(f"- tokenizer: {info['tokenizer']['type']}, {info['tokenizer']['vocab_size']:,} tokens")
    if task == "classify":
        lines.append(f"- labels: {', '.join(map(str, info['task'].get('labels', [])))}")
    run = info["run"]
    lines += ["", "## Training", ""]
    lines.append(f"- data: {', '.join(run.get('data') or []) or 'not recorded'}")
    if run.get("corpus"):
        lines.append(f"- corpus: {run['corpus']}")
    if isinstance(run.get("tokens"), dict):
        lines.append(f"- tokens: {run['tokens'].get('train', 0):,} train, {run['tokens'].get('val', 0):,} validation")
    if run.get("init"):
        lines.append(f"- started from: {run['init']}")
    lines.append(f"- steps: {info['steps'] if info['steps'] is not None else 'not recorded'}")
    if info["seconds"] is not None:
        lines.append(f"- training time: {info['seconds'] / 60:.1f} min")
    lines += ["", "## Results", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in metrics.items()] or ["- no validation recorded"]
    lines += ["", "## Intended use and limits", "",
              f"Intended for {USES.get(task or arch, 'research and teaching')}. It is a small model trained on "
              "the data above only: it knows nothing else, can state falsehoods fluently, repeats the biases "
              "of its data, and has not been evaluated for safety. Not for decisions about people.", ""]
    return "\n".join(lines)


def write_card(folder, library: str = "lmforge") -> Path:
    path = Path(folder) / CARD
    atomic_write_text(path, card_text(folder, library))
    return path
