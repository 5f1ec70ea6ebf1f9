"""`lmforge serve` under load: N concurrent streaming clients against continuous batching, and
the same load against a server that decodes one request at a time (--max-batch 1).

A decoder with random weights (8 layers × 512, a byte-level BPE of 4096 tokens trained on tiny
Shakespeare; random weights never emit end-of-text, so every request runs to its max_tokens) is
saved as a model folder and served by `python -m lmforge.cli serve` in a separate process. Each
of `--clients` threads sends `--requests` streaming completions in turn (a closed loop); the
client measures throughput (generated tokens per second of wall time), time to first token
and the gaps between tokens (p50/p99), and counts failed requests. Both servers run at once and
take `--rounds` rounds of this load in turns (A B A B ...); the speedup is the ratio of the
median throughputs. Then `--malformed` requests
from a table of broken bodies (bad JSON, invalid UTF-8, wrong types, out-of-range values,
oversized prompts, unknown models) must all get a 4xx, and /health must still answer ok.

    python benchmarks/serve_bench.py [--clients 16] [--requests 2] [--max-tokens 64] [--rounds 5] [--readme]

Prints one JSON object and a markdown table; --readme also saves the JSON in benchmarks/results/
and the table in README.md. Never asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SHAPE = dict(n_layer=8, n_head=8, n_embd=512, block_size=512)


def build_folder(folder: Path) -> int:
    """Write the served model folder; return its parameter count."""
    from lmforge.config import ModelConfig
    from lmforge.model import build_model
    from lmforge.model_folder import save_model
    from lmforge.tokenize import Tokenizer

    text = DATA.read_text(encoding="utf-8")[:300_000] if DATA.is_file() else "the quick brown fox. " * 5000
    tokenizer = Tokenizer.train("bpe", [text], vocab_size=4096)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPE)).eval()
    save_model(model, folder, tokenizer)
    return model.num_parameters()


def start_server(folder: Path, port: int, max_batch: int, max_tokens: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens", str(max_tokens),
               "--max-prompt-tokens", "256"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not start within 180 s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()  # SIGTERM: the graceful path
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion with `requests` (a thread per client); token arrival times as the client sees them."""
    start = time.perf_counter()
    times, tokens = [], 0
    try:
        with requests.post(url + "/v1/completions", stream=True, timeout=600,
                           json=completion_body(prompt, max_tokens)) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            usage = None
            for line in r.iter_lines():
                usage = read_event(line, times, usage)
            tokens = usage or 0
    except requests.RequestException as exc:
        return {"ok": False, "status": type(exc).__name__}
    return {"ok": tokens == max_tokens, "status": 200, "tokens": tokens, "start": start, "times": times,
            "end": time.perf_counter()}


async def one_request_async(session, url: str, prompt: str, max_tokens: int) -> dict:
    """The same request from an asyncio client (aiohttp): one thread reads every stream."""
    import aiohttp

    start = time.perf_counter()
    times, usage = [], None
    try:
        async with session.post(url + "/v1/completions", json=completion_body(prompt, max_tokens)) as r:
            if r.status != 200:
                return {"ok": False, "status": r.status}
            async for line in r.content:
                usage = read_event(line.rstrip(b"\r\n"), times, usage)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return {"ok": False, "status": type(exc).__name__}
    tokens = usage or 0
    return {"ok": tokens == max_tokens, "status": 200, "tokens": tokens, "start": start, "times": times,
            "end": time.perf_counter()}


def completion_body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def read_event(line: bytes, times: list[float], usage: int | None) -> int | None:
    """One server-sent event line: note when a token's text arrived; return the usage count if given."""
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return usage
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
        usage = chunk["usage"]["completion_tokens"]
    if chunk["choices"] and chunk["choices"][0]["text"]:
        times.append(time.perf_counter())
    return usage


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def run_load(url: str, clients: int, per_client: int, max_tokens: int, client: str) -> dict:
    """One round: every client sends its requests in turn; raw latencies kept for pooling."""
    prompts = [f"Client {i}: To be, or not to be, that is the question" for i in range(clients)]
    one_request(url, "warm up", 4)
    begin = time.perf_counter()
    if client == "threads":
        with ThreadPoolExecutor(clients) as pool:
            runs = list(pool.map(lambda i: [one_request(url, prompts[i], max_tokens) for _ in range(per_client)],
                                 range(clients)))
    else:
        runs = asyncio.run(_async_load(url, prompts, per_client, max_tokens))
    wall = time.perf_counter() - begin
    results = [r for client_runs in runs for r in client_runs]
    good = [r for r in results if r["ok"]]
    generated = sum(r["tokens"] for r in good)
    return {"requests": len(results), "failed": len(results) - len(good),
            "failures": Counter(str(r["status"]) for r in results if not r["ok"]),
            "tokens_per_s": generated / wall,
            "ttft": [r["times"][0] - r["start"] for r in good if r["times"]],
            "gaps": [b - a for r in good for a, b in zip(r["times"], r["times"][1:], strict=False)]}


async def _async_load(url: str, prompts: list[str], per_client: int, max_tokens: int) -> list[list[dict]]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client(prompt: str) -> list[dict]:
            return [await one_request_async(session, url, prompt, max_tokens) for _ in range(per_client)]

        return await asyncio.gather(*(client(p) for p in prompts))


def summarize(rounds: list[dict], clients: int) -> dict:
    """Throughput per round (median, min, max); latencies pooled over the rounds."""
    rates = sorted(r["tokens_per_s"] for r in rounds)
    ttft = [t for r in rounds for t in r["ttft"]]
    gaps = [g for r in rounds for g in r["gaps"]]
    return {"clients": clients, "rounds": len(rounds), "requests": sum(r["requests"] for r in rounds),
            "failed": sum(r["failed"] for r in rounds),
            "failures": dict(sum((r["failures"] for r in rounds), Counter())),
            "tokens_per_s": rates[len(rates) // 2], "tokens_per_s_each_round": [r["tokens_per_s"] for r in rounds],
            "tokens_per_s_min_max": [rates[0], rates[-1]],
            "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "inter_token_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99)}}


def malformed_bodies() -> list[tuple[str, bytes]]:
    """(path, body) pairs, each wrong in its own way; the table cycles to the requested count."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    bad = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "\xc3\x28"}', b'{"prompt": "\\ud800"}',
           b'{"prompt": "a", "max_tokens": NaN}', b'{"prompt": "a", "max_tokens": 1e999}', b"[" * 5000]
    table = [(path, body) for path in (c, chat, "/tokenize", "/detokenize") for body in bad]
    fields = [{"prompt": 5}, {"prompt": ""}, {"prompt": []}, {"prompt": [[-1]]}, {"prompt": [[10**9]]},
              {"prompt": "a", "max_tokens": -1}, {"prompt": "a", "max_tokens": 10**12}, {"prompt": "a", "n": 0},
              {"prompt": "a", "temperature": "hot"}, {"prompt": "a", "top_p": 0}, {"prompt": "a", "seed": 2**70},
              {"prompt": "a", "model": "nope"}, {"prompt": "a" * 20000}, {"prompt": "a", "logprobs": 99},
              {"prompt": "a", "stop": [1, 2]}, {"prompt": "a", "stream": "sometimes"}, {"max_tokens": 3}]
    table += [(c, json.dumps(f).encode()) for f in fields]
    messages = [{"messages": []}, {"messages": "hi"}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 5}]}]
    table += [(chat, json.dumps(m).encode()) for m in messages]
    table += [("/detokenize", b'{"tokens": [-3]}'), ("/detokenize", b'{"tokens": "abc"}'), ("/tokenize", b"{}")]
    return table


def run_malformed(url: str, count: int, workers: int = 16) -> dict:
    table = malformed_bodies()
    local = threading.local()

    def send(i: int) -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        path, body = table[i % len(table)]
        return local.session.post(url + path, data=body, timeout=60).status_code

    begin = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        statuses = Counter(pool.map(send, range(count)))
    health = requests.get(url + "/health", timeout=10).json().get("status")
    return {"requests": count, "distinct_bodies": len(table), "seconds": time.perf_counter() - begin,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "all_4xx": all(400 <= s < 500 for s in statuses), "health_after": health}


def benchmark(args) -> dict:
    """Both servers run side by side (an idle one costs nothing) and take the load in turns,
    A B A B ..., so that a slow spell of a shared machine falls on both."""
    out: dict = {}
    servers = {"batched": args.max_batch, "one_at_a_time": 1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "served-model"
        out["parameters"] = build_folder(folder)
        urls = {label: f"http://127.0.0.1:{args.port + i}" for i, label in enumerate(servers)}
        running = {}
        try:
            for i, (label, batch) in enumerate(servers.items()):
                running[label] = start_server(folder, args.port + i, batch, args.max_tokens)
            rounds: dict[str, list] = {label: [] for label in servers}
            for _ in range(args.rounds):
                for label in servers:
                    rounds[label].append(
                        run_load(urls[label], args.clients, args.requests, args.max_tokens, args.client))
            for label, batch in servers.items():
                out[label] = {"max_batch": batch, **summarize(rounds[label], args.clients)}
            if args.malformed:
                out["malformed"] = run_malformed(urls["batched"], args.malformed)
        finally:
            for server in running.values():
                stop_server(server)
    ratios = sorted(a["tokens_per_s"] / b["tokens_per_s"]
                    for a, b in zip(*(rounds[label] for label in servers), strict=True))
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"]
    out["speedup_each_round_min_max"] = [ratios[0], ratios[-1]]
    return out


def markdown(result: dict) -> str:
    lines = ["| server | clients | requests | generated tokens/s, median (min–max) | TTFT p50 / p99 | "
             "inter-token p50 / p99 | failed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("batched", f"continuous batching (--max-batch {result['batched']['max_batch']})"),
                       ("one_at_a_time", "one at a time (--max-batch 1)")):
        r = result[key]
        lines.append(f"| {label} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} "
                     f"({r['tokens_per_s_min_max'][0]:.1f}–{r['tokens_per_s_min_max'][1]:.1f}) | "
                     f"{r['ttft_s']['p50']:.2f} s / {r['ttft_s']['p99']:.2f} s | "
                     f"{1000 * r['inter_token_s']['p50']:.0f} ms / {1000 * r['inter_token_s']['p99']:.0f} ms | "
                     f"{r['failed']} |")
    low, high = result["speedup_each_round_min_max"]
    lines.append(f"\nThroughput with continuous batching: **{result['speedup']:.1f}×** the one-at-a-time "
                 f"server (medians of {result['batched']['rounds']} interleaved rounds; "
                 f"{low:.1f}–{high:.1f}× round by round).")
    if "malformed" in result:
        m = result["malformed"]
        fours = sum(v for k, v in m["statuses"].items() if k.startswith("4"))
        lines.append(f"{m['requests']:,} malformed requests ({m['distinct_bodies']} kinds): {fours:,} answered 4xx, "
                     f"{m['requests'] - fours} otherwise; /health after: {m['health_after']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--client", choices=["asyncio", "threads"], default="asyncio",
                        help="load generator: one asyncio thread (aiohttp) reading every stream, or a thread per "
                             "client (requests). Both share the server's two cores; the threads cost more CPU")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of load on each server")
    parser.add_argument("--malformed", type=int, default=5000, help="malformed requests to send (0: skip)")
    parser.add_argument("--port", type=int, default=8917)
    parser.add_argument("--readme", action="store_true", help="also save JSON in benchmarks/results/, table in README")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = {"benchmark": f"lmforge serve, {args.clients} streaming clients, random-weight decoder {SHAPE}",
              "command": command_line("serve_bench.py", sys.argv[1:]), "machine": machine(),
              "settings": {"client": args.client,
                           "clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
                           "max_tokens": args.max_tokens, "model": SHAPE}}
    result.update(benchmark(args))
    report("serve", result, markdown(result), args.json_out, args.readme)


if __name__ == "__main__":
    main()
