"""The serving engine: continuous batching over one model in one background thread.

Requests wait in a bounded queue; each loop of the engine admits some of them (prefilling them
as `generate` prefills a prompt, without padding: those of one length in one pass), then runs ONE
decoding step for every running request together, then drops the ones that finished. So
requests join and leave the batch at every step. Between two steps the running requests wait
for at most `prefill_budget` prompt tokens of prefill (or one prompt, if it is longer): a burst
of arrivals is admitted over several steps instead of stalling every running stream at once.

Each running request owns a row of a SlotCache. Tokens are picked by `generate.pick_next` with
the request's own settings and random generator, so a greedy request gives the tokens `lmforge
generate` gives for the same prompt; batched prefills and steps differ from generate's one-row
ones only by the order of floating-point sums in the batched kernels (tests/test_serve_engine.py
measures it).

Results go back through each job's `deliver` callback, called from the engine thread with
("prompt", scores), ("token", (id, logprob, top)) and finally ("end", reason), reason one of
"eos", "length", "cancelled", "timeout", "error: ...".
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, pick_next
from lmforge.serve.slots import SlotCache


class QueueFull(Exception):
    """The queue has no room: the caller answers 429 with Retry-After."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Job:
    """One sequence to generate (a request with n choices is n jobs)."""

    prompt: list[int]
    config: GenerationConfig
    max_new: int  # tokens to generate; 0 = score the prompt only
    deliver: Callable[[tuple], None]
    logprobs: int | None = None  # top-N alternatives per generated token (0 = the token's own only)
    echo_logprobs: int | None = None  # score the prompt's tokens too, with top-N alternatives
    timeout: float | None = None
    cancelled: bool = False  # set by the caller (client gone, stop string met): the slot frees next step
    submitted: float = field(default_factory=time.monotonic)
    generated: int = 0
    pending: int | None = None  # the last picked token, fed to the model by the next step
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout


def fit_prompt(prompt: list[int], max_tokens: int, block_size: int, echo: bool) -> tuple[list[int], int]:
    """(prompt, tokens to generate) within the context window, by `generate`'s rule: a long
    prompt keeps its end and at least half the window. A prompt to score (echo) is kept whole."""
    if echo:
        return prompt, max(0, min(max_tokens, block_size - len(prompt)))
    keep = max(block_size - max_tokens, block_size // 2, 1)
    prompt = prompt[-keep:]
    return prompt, min(max_tokens, block_size - len(prompt))


class Engine:
    def __init__(self, model, eos_id: int | None, max_batch: int = 16, max_queue: int = 64,
                 prefill_budget: int = 128):
        if model.config.arch != "decoder":
            raise LmforgeError(f"serve needs a decoder model; this folder holds an {model.config.arch} model")
        if max_batch < 1 or max_queue < 0:
            raise LmforgeError("max_batch must be at least 1 and max_queue at least 0")
        self.model, self.eos_id = model.eval(), eos_id
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.block_size = model.config.block_size
        self.slots = SlotCache(model, max_batch, self.block_size)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []  # row i of the slot cache is running[i]
        self.condition = threading.Condition()
        self.draining = self.stopped = False
        self.steps = self.generated_tokens = self.prompt_tokens = 0
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    # ------------------------------------------------------------- the caller's side

    def start(self) -> Engine:
        self.thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        """Queue all the jobs or none (QueueFull, Draining)."""
        with self.condition:
            if self.draining:
                raise Draining("the server is shutting down")
            if not self.thread.is_alive():  # never started, or died: better refused than left hanging
                raise Draining("the engine is not running")
            if len(self.queue) + len(jobs) > self.max_queue + max(0, self.max_batch - self._busy()):
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self.queue.extend(jobs)
            self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let queued and running ones finish, then end the thread."""
        with self.condition:
            self.draining = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def wake(self) -> None:
        """A job was cancelled: let an idle engine notice."""
        with self.condition:
            self.condition.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def _busy(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self.condition:
                    while not self.queue and not self.running and not self.draining:
                        self.condition.wait()
                    if self.draining and not self.queue and not self.running:
                        self.stopped = True
                        return
                    admitted = self._admit()
                self._start_all(admitted)
                self._drop_finished()
                if self.running:
                    try:
                        self._step()
                    except Exception as exc:  # noqa: BLE001 — fail the running jobs, keep serving
                        self._fail_running(exc)

    def _admit(self) -> list[Job]:
        """Jobs to start now: free rows, within the prefill budget (at least one job)."""
        now, admitted, budget = time.monotonic(), [], self.prefill_budget
        while self.queue and len(self.running) + len(admitted) < self.max_batch:
            job = self.queue[0]
            if job.cancelled or job.expired(now):
                self.queue.popleft()
                job.deliver(("end", "cancelled" if job.cancelled else "timeout"))
                continue
            if admitted and len(job.prompt) > budget:
                break
            budget -= len(job.prompt)
            admitted.append(self.queue.popleft())
        return admitted

    def _start_all(self, admitted: list[Job]) -> None:
        """Prompts of one length prefill together: one forward pass, no padding (a prompt to
        score, echo, prefills alone: it needs every position's logits)."""
        groups: dict[int, list[Job]] = {}
        for job in admitted:
            groups.setdefault(-id(job) if job.echo_logprobs is not None else len(job.prompt), []).append(job)
        for jobs in groups.values():
            try:
                ids = torch.tensor([job.prompt for job in jobs], dtype=torch.long)
                cache = self.model.new_cache(len(jobs), ids.shape[1])
                logits = self.model(ids, cache=cache, last_only=jobs[0].echo_logprobs is None).logits
            except Exception as exc:  # noqa: BLE001 — bad jobs must not stop the engine
                for job in jobs:
                    job.deliver(("end", f"error: {exc}"))
                continue
            self.prompt_tokens += ids.numel()
            for row, job in enumerate(jobs):
                self._start(job, logits[row], cache, row)

    def _start(self, job: Job, logits: torch.Tensor, cache, row: int) -> None:
        """Take a prefilled job into a slot and pick its first token."""
        if job.echo_logprobs is not None:
            job.deliver(("prompt", _prompt_scores(logits, job.prompt, job.echo_logprobs)))
        if job.max_new == 0:
            job.deliver(("end", "length"))
            return
        if job.config.seed is not None:
            job.generator = torch.Generator().manual_seed(job.config.seed)
        if job.config.repetition_penalty != 1.0:
            job.seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
            job.seen[0, job.prompt] = True
        self.slots.add(cache, row)
        self.running.append(job)
        self._advance(job, logits[-1:], argmax=None)

    def _step(self) -> None:
        self.slots.make_room()
        tokens = torch.tensor([[job.pending] for job in self.running], dtype=torch.long)
        cache = self.slots.view()
        logits = self.model(tokens, attention_mask=self.slots.mask(), cache=cache, last_only=True).logits[:, -1]
        self.slots.length = cache.length
        self.steps += 1
        argmax = logits.float().argmax(-1).tolist()
        for row, job in enumerate(self.running):
            self._advance(job, logits[row : row + 1], argmax[row])
        self._drop_finished()

    def _advance(self, job: Job, logits: torch.Tensor, argmax: int | None) -> None:
        """Pick the job's next token from its (1, V) logits and send it."""
        config = job.config
        if argmax is not None and config.greedy and job.seen is None:
            token = argmax  # what pick_next returns for this row, computed for the whole batch at once
        else:
            token = int(pick_next(logits, config, job.seen, job.generator)[0])
        if job.seen is not None:
            job.seen[0, token] = True
        logprob = top = None
        if job.logprobs is not None:
            scores = torch.log_softmax(logits[0].float(), -1)
            logprob = float(scores[token])
            top = _top(scores, job.logprobs)
        job.generated += 1
        self.generated_tokens += 1
        job.pending = token
        job.deliver(("token", (token, logprob, top)))

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for row in range(len(self.running) - 1, -1, -1):
            job = self.running[row]
            reason = None
            if job.cancelled:
                reason = "cancelled"
            elif self.eos_id is not None and job.pending == self.eos_id:
                reason = "eos"
            elif job.generated >= job.max_new:
                reason = "length"
            elif job.expired(now):
                reason = "timeout"
            if reason is None:
                continue
            self.slots.remove(row)
            self.running[row] = self.running[-1]
            self.running.pop()
            job.deliver(("end", reason))


    def _fail_running(self, exc: Exception) -> None:
        for row in range(len(self.running) - 1, -1, -1):
            self.slots.remove(row)
            self.running.pop().deliver(("end", f"error: {exc}"))


def _top(scores: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    values, ids = scores.topk(min(n, scores.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _prompt_scores(logits: torch.Tensor, prompt: list[int], n: int) -> list[tuple[float | None, list]]:
    """(logprob of each prompt token given the ones before, top-n alternatives); None for the first."""
    scores = torch.log_softmax(logits.float(), -1)
    out: list[tuple[float | None, list]] = [(None, [])]
    for position in range(1, len(prompt)):
        row = scores[position - 1]
        out.append((float(row[prompt[position]]), _top(row, n)))
    return out
