"""The playground page in a real headless Chromium (Debian's, driven by playwright; no browser
download): type a prompt, press Send, watch the streamed text grow, hover a token for its
probability. scripts/ensure_chromium.sh finds Chromium, or installs it with apt-get when it can;
the test is skipped, with the script's reason, only when there is none."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import one_thread, token_cache  # noqa: F401  (fixtures are registered by import)
from test_serve_load import slow_model
from test_serve_support import greedy_reference, live_server, loaded

ENSURE = Path(__file__).resolve().parents[1] / "scripts" / "ensure_chromium.sh"


def chromium() -> str:
    if ENSURE.is_file():
        found = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip().splitlines()[-1]
        pytest.skip(found.stderr.strip() or "no Chromium")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on PATH (install Debian's chromium package)")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield browser
        browser.close()


def test_prompt_streams_into_the_page(browser):
    model, tokenizer = slow_model(0.03)  # ~1 s of generation: the page is seen mid-stream
    expected = greedy_reference(*loaded(), "The quick", 30)
    with live_server(model, tokenizer) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        page.fill("#prompt", "The quick")
        page.fill("#max_tokens", "30")
        page.fill("#temperature", "0")
        page.click("#send")
        lengths = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lengths.append(page.eval_on_selector_all("#output .tok", "spans => spans.length"))
            if "tokens in" in page.inner_text("#status"):
                break
            time.sleep(0.05)
        assert page.inner_text("#error") == ""
        assert "30 tokens in" in page.inner_text("#status")
        assert any(0 < n < 30 for n in lengths), lengths  # seen part-way: streamed, not all at once
        assert page.inner_text("#output") == "The quick" + expected
        first = page.locator("#output .tok").first
        assert first.get_attribute("title").startswith("p = ")
        first.hover()
        assert page.inner_text("#tip").startswith("p = ")
        page.close()


def test_chat_mode_shows_the_conversation(browser):
    with live_server() as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.select_option("#mode", "chat")
        page.fill("#prompt", "The dog")
        page.fill("#max_tokens", "12")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')", timeout=30000)
        turns = page.locator("#chat .turn").all_inner_texts()
        assert turns[0] == "user:The dog" and turns[1].startswith("assistant:")
        page.close()
