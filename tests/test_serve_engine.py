"""The serving engine without HTTP: continuous batching must give `generate`'s tokens (greedy,
seeded sampling, repetition penalty, int8), and the slot cache must keep every row's keys and
values intact while rows join, leave and the time axis is compacted. One test measures how far
a batched step's logits are from the same row decoded alone."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from test_serve_support import loaded

from lmforge.config import ModelConfig
from lmforge.generate import GenerationConfig, generate
from lmforge.model import build_model
from lmforge.quantize import quantize_int8
from lmforge.serve.engine import Engine, Job, fit_prompt
from lmforge.serve.slots import SlotCache

PROMPTS = ["The quick", "A stitch in time", "All", "The dog sleeps in the sun. The quick brown fox", "sun. A",
           "glitters is not", "The lazy", "A stitch in time saves nine. All that glitters is not gold."]


def run_engine(model, tokenizer, requests: list[tuple[str, GenerationConfig]], max_batch: int = 3) -> list[str]:
    """Submit every request at once to an engine with few slots (so they queue, join and leave)."""
    engine = Engine(model, tokenizer.eos_id, max_batch=max_batch, max_queue=len(requests)).start()
    outputs: list[list[int]] = [[] for _ in requests]
    finished = threading.Semaphore(0)

    def deliver(index):
        def receive(event):
            if event[0] == "token" and event[1][0] != tokenizer.eos_id:
                outputs[index].append(event[1][0])
            elif event[0] == "end":
                assert not event[1].startswith("error"), event[1]
                finished.release()
        return receive

    jobs = []
    for i, (prompt, config) in enumerate(requests):
        ids, max_new = fit_prompt(tokenizer.encode(prompt), config.max_new_tokens, model.config.block_size, False)
        jobs.append(Job(ids, config, max_new, deliver(i)))
    engine.submit(jobs)
    for _ in requests:
        assert finished.acquire(timeout=60)
    engine.stop()
    return [tokenizer.decode(ids) for ids in outputs]


def test_greedy_equals_generate_while_rows_join_and_leave():
    model, tokenizer = loaded()
    config = GenerationConfig(max_new_tokens=40, temperature=0)
    requests = [(p, config) for p in PROMPTS * 2]
    expected = [generate(model, tokenizer, p, config) for p, _ in requests]
    assert run_engine(model, tokenizer, requests) == expected


def test_sampling_and_repetition_penalty_equal_generate():
    model, tokenizer = loaded()
    configs = [GenerationConfig(max_new_tokens=30, temperature=0.9, top_k=8, top_p=0.95, seed=11),
               GenerationConfig(max_new_tokens=30, temperature=0, repetition_penalty=1.3),
               GenerationConfig(max_new_tokens=30, temperature=1.2, min_p=0.05, repetition_penalty=1.1, seed=3)]
    requests = [(p, c) for p in PROMPTS[:4] for c in configs]
    expected = [generate(model, tokenizer, p, c) for p, c in requests]
    assert run_engine(model, tokenizer, requests, max_batch=5) == expected


def test_int8_weights_equal_generate_int8():
    model, tokenizer = loaded()
    int8 = quantize_int8(_copy(model))
    config = GenerationConfig(max_new_tokens=30, temperature=0)
    requests = [(p, config) for p in PROMPTS]
    assert run_engine(int8, tokenizer, requests) == [generate(int8, tokenizer, p, config) for p in PROMPTS]


def _copy(model):
    clone = build_model(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def _random_model(position: str):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=32, position=position,
                         dropout=0.0, attn_dropout=0.0)
    return build_model(config).eval()


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "relative"])
def test_slot_rows_keep_their_cache_through_join_leave_and_compaction(position):
    """Rows of different lengths stepped together give each row's own logits, as compaction
    moves them; the largest difference from decoding each row alone is printed (-s)."""
    model = _random_model(position)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17], [18]]
    slots, alone, worst, lengths = SlotCache(model, 4, 32), [], 0.0, []
    with torch.no_grad():
        for prompt in prompts:
            cache = model.new_cache(1, 32)
            model(torch.tensor([prompt]), cache=cache)
            slots.add(_one_row_copy(model, prompt))
            alone.append((cache, prompt))
        for step in range(26):
            if step == 5:  # the longest row leaves (the last row moves into its place), so the
                slots.remove(0)  # time axis fills up at step 22 and is realigned to the longest row left
                alone[0] = alone.pop()
            slots.make_room()
            lengths.append(slots.length)
            token = torch.tensor([[20 + step % 7]] * slots.rows)
            view = slots.view()
            batched = model(token, attention_mask=slots.mask(), cache=view, last_only=True).logits[:, -1]
            slots.length = view.length
            for row, (cache, _) in enumerate(alone):
                own = model(token[:1], cache=cache, last_only=True).logits[:, -1]
                worst = max(worst, float((batched[row] - own[0]).abs().max()))
    print(f"{position}: largest logit difference batched vs alone {worst:.2e}")
    assert worst < 1e-4
    assert max(lengths) == 31 and lengths[-1] < 31  # the time axis was full, then realigned


def _one_row_copy(model, prompt):
    cache = model.new_cache(1, len(prompt))
    model(torch.tensor([prompt]), cache=cache)
    return cache


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_prompts_prefilled_together_give_their_own_logits(position):
    """Same-length prompts arriving together share one prefill; printed: the largest difference."""
    model = _random_model(position)
    prompts = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [3, 3, 3, 3, 3, 3]])
    with torch.no_grad():
        together = model(prompts, cache=model.new_cache(3, 6)).logits
        alone = torch.cat([model(p[None], cache=model.new_cache(1, 6)).logits for p in prompts])
    worst = float((together - alone).abs().max())
    print(f"{position}: largest logit difference prefilled together vs alone {worst:.2e}")
    assert worst < 1e-4


def test_a_burst_of_prompts_is_admitted_within_the_prefill_budget():
    """Ten 20-token prompts arrive at once; with 50 prompt tokens of prefill allowed between two
    steps, two start per step, so the running requests are never held up by all ten."""
    model, tokenizer = loaded()
    engine = Engine(model, None, max_batch=10, max_queue=10, prefill_budget=50)
    first_step: list[int] = []  # engine.steps when each job got its first token
    done = threading.Semaphore(0)

    def receive(job):
        def deliver(event):
            if event[0] == "token" and job.generated == 1:
                first_step.append(engine.steps)
            elif event[0] == "end":
                done.release()
        return deliver

    jobs = [Job(tokenizer.encode("The quick brown fox " * 2)[:20], GenerationConfig(max_new_tokens=5, temperature=0),
                5, None) for _ in range(10)]
    for job in jobs:
        job.deliver = receive(job)
    engine.start().submit(jobs)
    for _ in jobs:
        assert done.acquire(timeout=60)
    engine.stop()
    assert sorted(first_step) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
