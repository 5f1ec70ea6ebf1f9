"""lm-evaluation-harness runs lmforge folders (`--model lmforge`, evaluate/harness.py) and agrees
with lmforge's own multiple-choice scores. Everything is local: the task YAML and its JSONL are
written here, the model is a tiny random one; nothing is downloaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import CHOICES, tiny_folder, write_jsonl
from helpers import TINYSHAKESPEARE, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.evaluate.choice import choice_scores, read_choices
from lmforge.model_folder import load_model

pytest.importorskip("lm_eval", reason="lm-eval (a dev extra) is not installed")

TASK_YAML = """\
task: lmforge_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
EXAMPLES = CHOICES + [
    {"context": "The sun", "choices": ["sleeps in the dog", "is not gold", "saves"], "label": 2},
    {"context": "Lazy", "choices": ["dog", "brown fox jumps"], "label": 1},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("harness") / "model", seed=3)


@pytest.mark.slow  # the harness's own start-up: ~20 s of imports on two cores
def test_lm_eval_cli_agrees_with_lmforge(folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "lmforge.evaluate.harness", "--model", "lmforge", "--model_args",
               f"pretrained={folder}", "--tasks", "lmforge_mc", "--include_path", str(tmp_path / "tasks"),
               "--output_path", str(tmp_path / "out"), "--log_samples", "--batch_size", "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["lmforge_mc"]

    assert main(["eval", str(folder), "--task", "choice", "--data", str(data), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert results["acc,none"] == ours["accuracy"] and results["acc_norm,none"] == ours["accuracy_norm"]

    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    model, tokenizer = load_model(folder)
    expected = choice_scores(model, tokenizer, read_choices(data))
    for sample in samples:  # every choice's log-likelihood, not only the winners
        harness = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert harness == pytest.approx(expected[sample["doc_id"]], abs=1e-5)


@pytest.mark.slow  # importing lm_eval alone takes ~12 s here
def test_model_class_scores_like_lmforge(folder):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from lmforge.evaluate import harness  # noqa: F401  (registers the class)

    lm = get_model("lmforge").create_from_arg_string(f"pretrained={folder}", {"batch_size": 2})
    pairs = [(e["context"], " " + c) for e in EXAMPLES for c in e["choices"]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = [score for score, _ in lm.loglikelihood(requests)]
    model, tokenizer = load_model(folder)
    expected = [s for row in choice_scores(model, tokenizer, read_choices(write_jsonl(
        Path(folder).parent / "mc.jsonl", EXAMPLES))) for s in row]
    assert got == pytest.approx(expected, abs=1e-4)  # other batches: float sums in another order

    text = TINYSHAKESPEARE.read_text(encoding="utf-8")[:600]  # longer than one window: rolled
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    assert len(ids) > model.config.block_size + 1
    total, block = 0.0, model.config.block_size
    with torch.no_grad():  # by hand: token t in the window of targets [first, stop), seeing all it may before t
        for t in range(1, len(ids)):
            first = 1 + (t - 1) // block * block
            stop = min(first + block, len(ids))
            context = ids[max(0, stop - 1 - block):t]
            logprobs = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].double(), -1)
            total += float(logprobs[ids[t]])
    assert rolling == pytest.approx(total, rel=1e-4)
    assert math.isfinite(rolling)
