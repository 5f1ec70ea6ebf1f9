"""docs/serving.md's nginx configuration, run as written: two `lmforge serve` replicas on
loopback behind nginx. Both replicas take requests, streams pass through unbuffered, and a
replica going down leaves the service answering. scripts/ensure_nginx.sh finds nginx, or installs
Debian's nginx-light when it can; the test is skipped, with the script's reason, only without it."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from test_serve_support import free_port, greedy_reference, live_server, loaded

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
ENSURE = Path(__file__).resolve().parents[1] / "scripts" / "ensure_nginx.sh"


def documented_config() -> str:
    blocks = re.findall(r"```nginx\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "docs/serving.md should hold one nginx block"
    return blocks[0]


def nginx_conf(folder: Path, replica_ports: list[int], port: int) -> Path:
    """The documented block with this test's ports, inside the few lines a standalone nginx needs."""
    block = documented_config()
    block = block.replace("127.0.0.1:8001", f"127.0.0.1:{replica_ports[0]}")
    block = block.replace("127.0.0.1:8002", f"127.0.0.1:{replica_ports[1]}")
    block = block.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
    temp = "".join(f"{name}_temp_path {folder}/{name};\n" for name in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(f"{user}worker_processes 1;\nerror_log {folder}/error.log;\npid {folder}/nginx.pid;\n"
                    f"events {{ worker_connections 256; }}\n"
                    f"http {{\naccess_log {folder}/access.log;\n{temp}{block}\n}}\n")
    return conf


def test_two_replicas_behind_the_documented_nginx(tmp_path):
    found = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
    if found.returncode != 0 or not found.stdout.strip():
        pytest.skip(found.stderr.strip() or "no nginx")
    nginx = found.stdout.strip().splitlines()[-1]
    model, tokenizer = loaded()
    with ExitStack() as stack:
        replicas = [stack.enter_context(live_server(copy.deepcopy(model), tokenizer)) for _ in range(2)]
        port = free_port()
        conf = nginx_conf(tmp_path, [int(url.rsplit(":", 1)[1]) for url, _ in replicas], port)
        check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                                 stderr=subprocess.PIPE, text=True)
        stack.callback(lambda: (proxy.terminate(), proxy.wait(10)))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read()
                time.sleep(0.05)

        expected = greedy_reference(model, tokenizer, "The quick", 12)
        with requests.Session() as session:
            for _ in range(8):
                out = session.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 12,
                                                                  "temperature": 0}, timeout=30).json()
                assert out["choices"][0]["text"] == expected
        served = [server.engine.prompt_tokens for _, server in replicas]
        assert all(count > 0 for count in served), served  # both replicas took requests

        with requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 20, "stream": True},
                           stream=True, timeout=30) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert len(events) >= 20 and events[-1] == b"data: [DONE]"

        replicas[0][1].http.should_exit = True  # one replica goes away
        time.sleep(0.5)
        for _ in range(4):
            out = requests.post(url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 12,
                                                               "temperature": 0}, timeout=30)
            assert out.status_code == 200 and out.json()["choices"][0]["text"] == expected
