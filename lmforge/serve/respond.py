"""One request's run through the engine, and the OpenAI JSON it turns into.

`Generation` makes the request's jobs (prompts × n), submits them together, and yields each
choice's released tokens as the engine produces them, stopping a choice in the engine as soon
as its stop string appears. The completion and chat endpoints differ only in how a choice's
text and logprobs are written (`CompletionFormat`, `ChatFormat`), streamed or whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from lmforge.generate import GenerationConfig
from lmforge.serve.engine import Draining, Job, QueueFull, fit_prompt
from lmforge.serve.protocol import ApiError
from lmforge.serve.text import ChoiceText, Released

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "timeout", "cancelled": "cancelled"}


class Inbox:
    """Events from the engine thread to one event loop, with one wake-up per burst.

    The engine delivers a token to every running request at each step. Waking the loop once per
    token (`call_soon_threadsafe`: a write to its self-pipe, a select, a callback) costs the
    two cores a system call and a loop turn per token; here the first event of a step schedules
    one drain, and the rest of the step's events join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events = loop, collections.deque()
        self.lock, self.scheduled = threading.Lock(), False

    def put(self, queue: asyncio.Queue, item) -> None:  # the engine thread
        self.events.append((queue, item))
        with self.lock:
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server has stopped
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # the event loop
        with self.lock:
            self.scheduled = False
        while self.events:
            queue, item = self.events.popleft()
            queue.put_nowait(item)


@dataclass
class Choice:
    index: int
    prompt: list[int]
    job: Job
    text: ChoiceText
    copy: int = 0  # which of the prompt's n choices
    echo: str | None = None  # the prompt text, when echoed
    scores: list | None = None  # the prompt's (logprob, top) when echo asks for logprobs
    finish: str | None = None


@dataclass
class Generation:
    """The jobs of one request and their results as they arrive."""

    server: object  # app.Server
    choices: list[Choice] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    streaming: bool = False  # once a stream has begun, problems end it in-band, not as an HTTP status

    def add(self, prompt: list[int], config: GenerationConfig, max_tokens: int, copy: int, echo: str | None,
            logprobs: int | None, echo_logprobs: int | None) -> None:
        server = self.server
        prompt, max_new = fit_prompt(prompt, max_tokens, server.block_size, echo_logprobs is not None)
        job = Job(prompt, config, max_new, deliver=None, logprobs=logprobs, echo_logprobs=echo_logprobs,
                  timeout=server.settings.timeout)
        text = ChoiceText(server.tokenizer, config.stop, server.output_filter, server.tokenizer.eos_id)
        self.choices.append(Choice(len(self.choices), prompt, job, text, copy, echo))

    def submit(self) -> None:
        """Queue every choice's job, or answer 429 (queue full) / 503 (shutting down)."""
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        server = self.server
        if getattr(server, "inbox", None) is None or server.inbox.loop is not loop:
            server.inbox = Inbox(loop)
        inbox, queue = server.inbox, self.queue

        def deliver(index: int, event: tuple) -> None:  # called by the engine thread
            inbox.put(queue, (index, event))

        for choice in self.choices:
            choice.job.deliver = functools.partial(deliver, choice.index)
        try:
            self.server.engine.submit([c.job for c in self.choices])
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
        except Draining as exc:
            raise ApiError(503, str(exc), code="shutting_down") from None

    async def run(self):
        """Yield (choice, released tokens, finished?) until every choice has finished."""
        engine, waiting = self.server.engine, len(self.choices)
        try:
            while waiting:
                index, (kind, data) = await self.queue.get()
                choice = self.choices[index]
                if choice.finish is not None:
                    continue  # the engine's last word on a choice a stop string already ended
                if kind == "prompt":
                    choice.scores = data
                    continue
                if kind == "token":
                    self.first_token = self.first_token or time.monotonic()
                    released = choice.text.push(*data)
                    if not choice.text.stopped:
                        yield choice, released, False
                        continue
                    choice.job.cancel()
                    engine.wake()
                    data = "stop"
                elif data.startswith("error"):
                    raise RuntimeError(f"the engine failed: {data}")
                else:
                    released = []
                if data == "timeout" and not choice.text.count and not self.streaming:
                    raise ApiError(503, "the request timed out waiting for the model; retry later",
                                   code="timeout", headers={"Retry-After": "1"})
                choice.finish = FINISH[data]
                waiting -= 1
                yield choice, released + choice.text.finish(), True
        finally:
            for choice in self.choices:
                choice.job.cancel()
            engine.wake()

    def usage(self) -> dict:
        prompt = sum(len(c.prompt) for c in self.choices if c.copy == 0)
        completion = sum(c.text.count for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_string(tokenizer, token: int, output_filter) -> str:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return output_filter.mask(text) if output_filter else text


class CompletionFormat:
    """`/v1/completions`: text, and logprobs as parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, server, want_logprobs: bool):
        self.server, self.want_logprobs = server, want_logprobs

    def prefix(self, choice: Choice) -> tuple[str, dict | None]:
        """The echoed prompt's text and logprobs."""
        if choice.echo is None:
            return "", None
        if choice.scores is None:
            return choice.echo, None
        tok, f = self.server.tokenizer, self.server.output_filter
        tokens = [token_string(tok, t, None) for t in choice.prompt]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        tops = [None] + [{token_string(tok, i, f): lp for i, lp in top} for _, top in choice.scores[1:]]
        return choice.echo, {"tokens": tokens, "token_logprobs": [s for s, _ in choice.scores],
                             "top_logprobs": tops, "text_offset": offsets}

    def logprobs(self, released: list[Released], start: int) -> dict:
        tok, f = self.server.tokenizer, self.server.output_filter
        return {"tokens": [r.text for r in released], "token_logprobs": [r.logprob for r in released],
                "top_logprobs": [{token_string(tok, i, f): lp for i, lp in (r.top or [])} for r in released],
                "text_offset": [start + r.offset for r in released]}

    def piece(self, choice: Choice, released: list[Released], first: bool, stream: bool) -> dict:
        text, logprobs = self.prefix(choice) if first else ("", None)
        body = {"index": choice.index, "text": text + "".join(r.text for r in released), "logprobs": None,
                "finish_reason": choice.finish}
        if self.want_logprobs:
            start = len(choice.echo or "")
            generated = self.logprobs(released, start)
            if logprobs is None:
                logprobs = generated
            else:
                for key in logprobs:
                    logprobs[key] += generated[key]
            body["logprobs"] = logprobs
        return body


class ChatFormat(CompletionFormat):
    """`/v1/chat/completions`: a message (or deltas of one), logprobs as a list of token objects."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def logprobs(self, released: list[Released], start: int) -> dict:
        tok, f = self.server.tokenizer, self.server.output_filter

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(r.text, r.logprob),
                             "top_logprobs": [entry(token_string(tok, i, f), lp) for i, lp in (r.top or [])]}
                            for r in released]}

    def piece(self, choice: Choice, released: list[Released], first: bool, stream: bool) -> dict:
        content = "".join(r.text for r in released)
        message = ({"role": "assistant", "content": content} if first or not stream else {"content": content})
        body = {"index": choice.index, ("delta" if stream else "message"): message, "logprobs": None,
                "finish_reason": choice.finish}
        if self.want_logprobs:
            body["logprobs"] = self.logprobs(released, 0)
        return body


def envelope(fmt: CompletionFormat, rid: str, created: int, model: str, choices: list, chunk: bool) -> dict:
    return {"id": rid, "object": fmt.chunk_object if chunk else fmt.object, "created": created, "model": model,
            "choices": choices}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def collect(gen: Generation, fmt: CompletionFormat, request, model: str) -> dict:
    """The whole response; a client that hangs up meanwhile cancels its jobs."""
    parts: dict[int, list[Released]] = {c.index: [] for c in gen.choices}

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        for choice in gen.choices:
            choice.job.cancel()
        gen.server.engine.wake()

    watcher = asyncio.create_task(watch())
    try:
        async for choice, released, _ in gen.run():
            parts[choice.index] += released
    finally:
        watcher.cancel()
    choices = [fmt.piece(c, parts[c.index], True, False) for c in gen.choices]
    body = envelope(fmt, new_id(isinstance(fmt, ChatFormat)), int(time.time()), model, choices, chunk=False)
    body["usage"] = gen.usage()
    return body


async def stream(gen: Generation, fmt: CompletionFormat, model: str, include_usage: bool):
    """Server-sent events as OpenAI sends them: one chunk per choice per step, then [DONE]. A
    failure after the stream began can only be told in-band: an `error` event, then [DONE]."""
    rid, created, started = new_id(isinstance(fmt, ChatFormat)), int(time.time()), set()
    chat = isinstance(fmt, ChatFormat)
    gen.streaming = True
    try:
        async for choice, released, done in gen.run():
            first = choice.index not in started
            if not (released or done or (first and (chat or choice.echo is not None))):
                continue
            started.add(choice.index)
            yield sse(envelope(fmt, rid, created, model, [fmt.piece(choice, released, first, True)], chunk=True))
    except Exception as exc:  # noqa: BLE001 — the status line is long gone
        yield sse(ApiError(500, f"generation failed: {exc}").body())
    else:
        if include_usage:
            yield sse({**envelope(fmt, rid, created, model, [], chunk=True), "usage": gen.usage()})
    yield sse("[DONE]")
