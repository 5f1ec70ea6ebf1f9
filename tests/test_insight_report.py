"""The run report (lmforge report): one self-contained HTML page, opened in a real headless
Chromium (Debian's chromium, through playwright): no console errors, every image loaded."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_options, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.train.pretrain import prepare_run

ENSURE = Path(__file__).resolve().parents[1] / "scripts" / "ensure_chromium.sh"


def chromium() -> str:
    """The browser's path; installs Debian's chromium if it can; skips the test with the reason if not."""
    done = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(done.stderr.strip() or "chromium cannot be found or installed")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    prepare_run(tiny_options(root, max_steps=12, eval_every=4, log_every=2, eval_batches=2)).trainer.fit()
    return root / "run"


def test_report_is_self_contained(run_dir, capsys):
    assert main(["report", str(run_dir), "--prompt", "The dog"]) == 0
    path = Path(capsys.readouterr().out.strip())
    page = path.read_text(encoding="utf-8")
    assert path == run_dir / "report.html"
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing outside the page
    assert page.count('src="data:image/png;base64,') == 6  # five panels and the overview
    for heading in ("Summary", "Final metrics", "Training curves", "Data", "Hardware", "Model config",
                    "Training config", "Samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "<b>The dog</b>" in page and "val loss" in page and "1 files, 1 documents" in page


def test_report_opens_in_headless_chromium(run_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (a dev extra) is not installed")
    executable = chromium()
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(out.as_uri(), wait_until="load")
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
        title = page.title()
        browser.close()
    assert errors == []
    assert len(images) == 6 and all(complete and width > 0 for complete, width, _ in images), images
    assert {alt for _, _, alt in images} == {"loss", "perplexity", "lr", "tokens_per_s", "grad_norm", "overview"}
    assert title == "lmforge run report"
