"""Instruction tuning: prompt/response pairs or chat conversations → a decoder trained to answer.

A conversation becomes text through a chat template, a Jinja template over `messages` (as
Hugging Face's `chat_template` is, and rendered the same way: trim_blocks, lstrip_blocks, in a
sandbox), stored in the model folder's task.json so that `generate --chat` and serving format
prompts exactly as training did. The loss covers the assistant's tokens only: the user's and
the template's tokens are context, never targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.tabular import Row, Skipped

IGNORE = -100
ROLES = ("system", "user", "assistant")
# The plain default: readable markers between turns, the end-of-text token closing each answer
# (so generation knows where an answer ends, and an answer's targets are its text and that
# token), and an open "### Assistant:" when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (  # newlines as Jinja string escapes: trim_blocks eats one written after a tag
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message.role == 'system' %}{{ message.content }}"
    "{% elif message.role == 'user' %}### User:{{ '\\n' }}{{ message.content }}"
    "{% else %}### Assistant:{{ '\\n' }}{{ message.content }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}### Assistant:{{ '\\n' }}{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token at each position, or IGNORE where nothing is to be learned


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The conversation as text; a template that does not render is one clear error."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    special = {role: tokenizer.id_to_token(i) if i is not None else "" for role, i in
               (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id))}
    try:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **special)
    except jinja2.TemplateError as exc:
        raise LmforgeError(f"the chat template does not render: {exc}") from None


def conversation(row: Row) -> tuple[list[dict] | None, str | None]:
    """(messages, None), or (None, why the row cannot be used): `messages` in the chat format, or
    `prompt` and `response` (a one-turn conversation)."""
    fields = row.fields
    if "messages" in fields:
        messages = fields["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return None, "messages that are not a list of objects"
        for message in messages:
            if message.get("role") not in ROLES:
                return None, f"a role other than {', '.join(ROLES)}"
            if not isinstance(message.get("content"), str):
                return None, "a message without text content"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return None, "no assistant message to learn"
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    prompt, response = fields.get("prompt"), fields.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        return None, "no prompt and response (nor messages)"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_conversation(messages: list[dict], tokenizer, template: str, max_len: int) -> Example | None:
    """Token ids of the whole conversation (at most max_len + 1, the last only as a target), with
    the assistant's tokens as targets. Each answer's span is found by rendering the conversation up
    to it (with the generation prompt) and through it; token prefixes are compared, so a merge
    across the boundary only moves the span's edge. None if no target fits in the block."""
    full = tokenizer.encode(render(template, messages, tokenizer))[: max_len + 1]
    targets = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.encode(render(template, messages[:i], tokenizer, add_generation_prompt=True))
        through = tokenizer.encode(render(template, messages[: i + 1], tokenizer))
        start, end = _common_prefix(full, before), _common_prefix(full, through)
        for t in range(start, end):
            targets[t] = True
    labels = [full[t + 1] if targets[t + 1] else IGNORE for t in range(len(full) - 1)]
    if all(label == IGNORE for label in labels):
        return None
    return Example(full[:-1], labels)


def build_examples(rows: list[Row], tokenizer, template: str, max_len: int, path) -> tuple[list[Example], Skipped]:
    skipped, examples = Skipped(str(path)), []
    for row in rows:
        messages, problem = conversation(row)
        if messages is None:
            skipped.add(problem, row.line)
            continue
        example = encode_conversation(messages, tokenizer, template, max_len)
        if example is None:
            skipped.add("no answer token within the model's block", row.line)
        else:
            examples.append(example)
    return examples, skipped


def collate(examples: list[Example], pad_id: int) -> dict:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def score(model, examples: list[Example], batch_size: int, pad_id: int) -> dict:
    """Loss and perplexity over every answer token (each batch weighted by its target count)."""
    if not examples:
        raise LmforgeError("no examples to score")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        targets = int((batch["labels"] != IGNORE).sum())
        loss = model(**{k: v.to(device) for k, v in batch.items()}, return_logits=False).loss
        total, count = total + float(loss) * targets, count + targets
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def chat_template_of(folder) -> str:
    """The folder's chat template: an instruction-tuned folder's task.json, a Hugging Face
    folder's tokenizer_config.json, else the plain default."""
    import json
    from pathlib import Path

    from lmforge.model_folder import read_task

    task = read_task(folder) or {}
    if task.get("chat_template"):
        return task["chat_template"]
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return DEFAULT_CHAT_TEMPLATE


def chat_prompts(folder, tokenizer, texts: list[str]) -> list[str]:
    """Each text as the user's turn of a new conversation, ready for the assistant's reply."""
    template = chat_template_of(folder)
    return [render(template, [{"role": "user", "content": text}], tokenizer, add_generation_prompt=True)
            for text in texts]
