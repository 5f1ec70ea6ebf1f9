"""lmforge serve under load and abuse: 32 concurrent streams, greedy output under concurrency,
disconnects, the queue's backpressure, timeouts, API keys and rate limits, graceful shutdown,
and a fuzz of malformed requests that must never get a 5xx."""

from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_support import greedy_reference, live_server, loaded

from lmforge.serve.engine import fit_prompt

PROMPTS = ["The quick", "A stitch in", "All that", "The dog sleeps", "T", "The lazy dog. The quick brown",
           "A stitch in time saves nine. All that glitters", "sun"]


def slow_model(seconds: float):
    """The tiny model, each forward delayed: long enough to disconnect or fill the queue mid-request."""
    model, tokenizer = loaded()
    slow = copy.deepcopy(model)
    inner = slow.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return inner(*args, **kwargs)

    slow.forward = forward
    return slow, tokenizer


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_32_concurrent_streams_complete_with_greedy_text():
    """Every stream gets exactly the tokens it asked for (as many as fit the 64-token window), and
    each text is what `generate` gives for that prompt alone, although requests join and leave a
    shared batch of 8 all the time."""
    model, tokenizer = loaded()
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + (i * 7) % 40) for i in range(32)]
    with live_server(max_batch=8, max_queue=64) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)

        def run(job):
            prompt, max_tokens = job
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0, logprobs=0, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            tokens = sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs)
            return text, tokens, chunks[-1].usage.completion_tokens

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, jobs))
        assert server.engine.steps < sum(m for _, m in jobs)  # they did share steps
    for (prompt, max_tokens), (text, tokens, usage) in zip(jobs, results, strict=True):
        _, fits = fit_prompt(tokenizer.encode(prompt), max_tokens, 64, echo=False)
        assert tokens == usage == fits
        assert text == greedy_reference(model, tokenizer, prompt, max_tokens), prompt


def test_disconnect_frees_the_slot():
    model, tokenizer = slow_model(0.02)
    with live_server(model, tokenizer, max_batch=2) as (url, server):
        with requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 60, "stream": True},
                           stream=True, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert server.engine.batch_size == 1
        assert wait_for(lambda: server.engine.batch_size == 0, 2.0)
        made = server.engine.generated_tokens
        time.sleep(0.2)
        assert server.engine.generated_tokens == made < 40


def test_a_caller_who_stops_waiting_frees_the_slot_too():
    """Not streamed: the server notices the closed connection while it generates."""
    model, tokenizer = slow_model(0.02)
    with live_server(model, tokenizer, max_batch=2) as (url, server):
        with pytest.raises(requests.Timeout):
            requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 60}, timeout=0.3)
        assert wait_for(lambda: server.engine.batch_size == 0, 2.0)
        assert server.engine.generated_tokens < 50


def test_full_queue_answers_429_with_retry_after():
    model, tokenizer = slow_model(0.02)
    with live_server(model, tokenizer, max_batch=1, max_queue=1) as (url, server):
        body = {"prompt": "The", "max_tokens": 50, "stream": True}
        first = requests.post(url + "/v1/completions", json=body, stream=True, timeout=30)
        assert wait_for(lambda: server.engine.batch_size == 1)
        second = threading.Thread(target=requests.post, args=(url + "/v1/completions",),
                                  kwargs={"json": {**body, "stream": False}, "timeout": 30})
        second.start()
        assert wait_for(lambda: server.engine.queue_depth == 1)
        third = requests.post(url + "/v1/completions", json=body, timeout=30)
        assert third.status_code == 429 and third.headers["Retry-After"] == "1"
        assert third.json()["error"]["code"] == "queue_full"
        first.close()
        second.join(30)
        assert requests.get(url + "/health").json()["status"] == "ok"


def test_timeout_ends_a_request_with_what_it_has():
    model, tokenizer = slow_model(0.02)
    with live_server(model, tokenizer, timeout=0.3) as (url, _):
        out = requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 60}, timeout=30).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "timeout" and 0 < out["usage"]["completion_tokens"] < 60


def test_a_request_that_times_out_in_the_queue_gets_503():
    """The engine is held inside a step (a gate in the model) while the queued request's time runs out."""
    model, tokenizer = loaded()
    gated, gate = copy.deepcopy(model), threading.Event()
    inner = gated.forward

    def forward(*args, **kwargs):
        assert gate.wait(10)
        return inner(*args, **kwargs)

    gated.forward = forward
    gate.set()
    with live_server(gated, tokenizer, max_batch=1, timeout=0.5) as (url, server):
        running = threading.Thread(target=requests.post, args=(url + "/v1/completions",),
                                   kwargs={"json": {"prompt": "The", "max_tokens": 60}, "timeout": 30})
        running.start()
        assert wait_for(lambda: server.engine.batch_size == 1)
        gate.clear()  # the running request's next step waits here
        answers = []
        queued = threading.Thread(target=lambda: answers.append(requests.post(
            url + "/v1/completions", json={"prompt": "The", "max_tokens": 5}, timeout=30)))
        queued.start()
        assert wait_for(lambda: server.engine.queue_depth == 1)
        time.sleep(0.7)
        gate.set()
        queued.join(30)
        running.join(30)
    assert answers[0].status_code == 503 and answers[0].headers["Retry-After"] == "1"
    assert answers[0].json()["error"]["code"] == "timeout"


def test_api_keys_and_rate_limit():
    with live_server(api_keys=["k1", "k2"], rate_limit=3) as (url, _):
        def client(key):
            return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

        with pytest.raises(openai.AuthenticationError):
            client("wrong").completions.create(model="tiny", prompt="The", max_tokens=1)
        assert requests.post(url + "/v1/completions", json={"prompt": "The"}).status_code == 401
        assert requests.get(url + "/health").status_code == 200  # probes need no key
        for _ in range(3):
            client("k1").completions.create(model="tiny", prompt="The", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            client("k1").completions.create(model="tiny", prompt="The", max_tokens=1)
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        client("k2").completions.create(model="tiny", prompt="The", max_tokens=1)  # each key has its own budget


def test_shutdown_finishes_running_streams_and_refuses_new_ones():
    """What uvicorn does on SIGTERM (should_exit): the open stream still ends with [DONE]."""
    model, tokenizer = slow_model(0.01)
    with live_server(model, tokenizer) as (url, server):
        r = requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 40, "stream": True},
                          stream=True, timeout=30)
        lines = r.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line)
        server.http.should_exit = True  # the engine keeps decoding until the app's lifespan ends
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in [first, *rest[:-1]])
        assert len(text) == 40 and server.engine.generated_tokens == 40
        assert wait_for(lambda: _refused(url), 10)


def _refused(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=1)
    except requests.ConnectionError:
        return True
    return False


# ------------------------------------------------------------------ malformed requests

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "logprobs", "echo", "repetition_penalty", "tokens", "top_logprobs", "min_p"]
VALUES = JSON | st.sampled_from([-1, 0, 10**30, -(10**30), 1e308, "", "x" * 10_000, [[-5]], [[10**9]], [[]],
                                 [{"role": "user"}], [{"role": "wizard", "content": "hi"}], [{"content": 3}]])
RAW = [b"", b"{", b"[]", b"null", b"\xff\xfe{", b'{"prompt": "\xc3\x28"}', b'{"prompt": "\\ud800"}',
       b'{"prompt": "hi", "max_tokens": NaN}', b'{"prompt": "hi", "max_tokens": 1e999}', b"[" * 100_000,
       b'{"prompt": "hi"' + b" " * 10, b'{"prompt": ' + b'"a",' * 3 + b"}", b"\x00" * 10]
PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def fuzz_server():
    with live_server(max_tokens=8, max_body=1 << 16) as running:
        yield running


@pytest.mark.parametrize("body", RAW)
@pytest.mark.parametrize("path", PATHS)
def test_malformed_bodies_get_4xx(fuzz_server, path, body):
    r = requests.post(fuzz_server[0] + path, data=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert "message" in r.json()["error"]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_fuzzed_requests_never_get_a_5xx(fuzz_server, path, body):
    url = fuzz_server[0]
    r = requests.post(url + path, data=json.dumps(body), timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_healthy_after_the_fuzz(fuzz_server):
    url = fuzz_server[0]
    assert requests.get(url + "/health").json()["status"] == "ok"
    out = requests.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 8, "temperature": 0})
    model, tokenizer = loaded()
    assert out.json()["choices"][0]["text"] == greedy_reference(model, tokenizer, "The quick", 8)
