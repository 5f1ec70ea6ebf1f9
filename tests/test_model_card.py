"""Model cards (lmforge/insight/card.py): README.md in saved model folders and published runs,
with the Hugging Face Hub's YAML block (read back by huggingface_hub itself), carried over by
convert --to-hf."""

from __future__ import annotations

import pytest
from eval_helpers import bpe_tokenizer, tiny_model
from helpers import tiny_options, token_cache  # noqa: F401

from lmforge.cli import main
from lmforge.model_folder import save_model
from lmforge.train.checkpoint import checkpoint_dirs
from lmforge.train.pretrain import prepare_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    gpt2_like = dict(position="learned", norm="layernorm", activation="gelu_tanh", bias=True)  # convertible
    prepared = prepare_run(tiny_options(root, max_steps=12, eval_every=6, log_every=3, eval_batches=2, **gpt2_like))
    prepared.trainer.fit()
    return root / "run", prepared.model


def test_a_run_folder_has_a_card_with_its_facts(run):
    from huggingface_hub import ModelCard

    folder, model = run
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "lmforge" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["lmforge", "decoder"] and "loss" in card.data.metrics
    text = (folder / "README.md").read_text()
    assert f"{model.num_parameters() / 1e6:.2f}M parameters" in text
    assert "- n_layer: 1" in text and "- tokenizer: WordLevel" in text  # the char tokenizer's model
    assert "- steps: 12" in text and "- training time: " in text and "- val loss: " in text
    assert "1 files, 1 documents" in text and "## Intended use and limits" in text
    assert not any((c / "README.md").exists() for c in checkpoint_dirs(folder))  # checkpoints go without


def test_convert_to_hf_carries_the_card(run, tmp_path):
    from huggingface_hub import ModelCard

    folder, _ = run
    assert main(["convert", "--to-hf", str(folder), "--out", str(tmp_path / "hf")]) == 0
    converted = (tmp_path / "hf" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "hf" / "README.md").data.library_name == "transformers"
    assert converted.split("---", 2)[2] == (folder / "README.md").read_text().split("---", 2)[2]


def test_a_bare_saved_model_says_what_it_does_not_know(tmp_path):
    tokenizer = bpe_tokenizer()
    save_model(tiny_model(tokenizer, "encoder"), tmp_path / "enc", tokenizer)
    text = (tmp_path / "enc" / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: lmforge\n") and "pipeline_tag: fill-mask" in text
    assert "- data: not recorded" in text and "- steps: not recorded" in text and "no validation recorded" in text
    assert "- tokenizer: BPE, 320 tokens" in text
