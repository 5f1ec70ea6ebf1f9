"""heads.vocabulary_loss: the loss of a vocabulary head computed a chunk of rows at a time.
Same loss and gradients as F.cross_entropy over all logits, for every head the model family
has, and no vocabulary-sized tensor kept for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import LanguageModel, heads

VOCAB = 300


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so a batch of ~100 target rows takes many chunks and a partial last one."""
    monkeypatch.setattr(heads, "LOSS_CHUNK", VOCAB * 7)
    # without gradients: tiles of 7 rows × 64 vocabulary entries, the last one 44 wide
    monkeypatch.setattr(heads, "TILE_ROWS", 7)
    monkeypatch.setattr(heads, "TILE_COLUMNS", 64)


def model_and_batch(arch: str, **options):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=24, block_size=64, arch=arch, **options)
    model = LanguageModel(config).train()
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100  # rows without a target, at the start and the end
    labels[2, 31:] = -100
    inputs = {"labels": labels, **({"decoder_input_ids": ids} if arch == "encoder-decoder" else {})}
    return model, ids, inputs


def loss_and_grads(model, ids, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, **inputs, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,options", [("decoder", {}), ("decoder", {"tie_embeddings": False}),
                                          ("encoder", {}), ("encoder-decoder", {"lm_head_bias": True})])
def test_chunked_loss_and_gradients_equal_the_plain_ones(small_chunks, arch, options):
    model, ids, inputs = model_and_batch(arch, **options)
    want, want_grads = loss_and_grads(model, ids, inputs)
    got, grads = loss_and_grads(model, ids, inputs, return_logits=False)
    assert got.logits is None and want.logits.shape[-1] == VOCAB
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation: the loss alone, tile by tile, no gradients taken on the way
        torch.testing.assert_close(model(ids, **inputs, return_logits=False).loss, want.loss, rtol=1e-6, atol=1e-6)


def test_tiles_pick_each_target_from_the_tile_that_holds_it(small_chunks):
    """Targets at the edges of tiles (0, 63, 64, the last id): a target taken from the wrong tile,
    or a tile's log-sum-exp left out, changes the loss."""
    model, ids, inputs = model_and_batch("decoder", tie_embeddings=False)
    labels = inputs["labels"]
    labels[1, :8] = torch.tensor([0, 63, 64, 127, 128, 255, 256, VOCAB - 1])
    with torch.no_grad():
        want = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(ids, **inputs, return_logits=False).loss, want, rtol=1e-6, atol=1e-6)


def test_gradients_scale_with_the_loss(small_chunks):
    """Gradient accumulation divides the loss: backward must scale what forward computed."""
    model, ids, inputs = model_and_batch("decoder")
    _, want = loss_and_grads(model, ids, inputs, return_logits=False)
    model.zero_grad(set_to_none=True)
    (model(ids, **inputs, return_logits=False).loss / 4).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad * 4, want[name], rtol=1e-5, atol=1e-8, msg=name)


def largest_saved(model, ids, inputs, **kwargs) -> int:
    """Elements of the largest tensor autograd keeps for backward during one forward pass."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, **inputs, **kwargs)
    return max(sizes)


def test_no_vocabulary_sized_tensor_is_kept(small_chunks):
    model, ids, inputs = model_and_batch("decoder")
    rows = ids.numel()
    assert largest_saved(model, ids, inputs) >= rows * VOCAB  # the plain path keeps every logit
    assert largest_saved(model, ids, inputs, return_logits=False) < rows * VOCAB / 3  # the FFN activations


def test_small_batches_and_autocast_keep_the_plain_path(monkeypatch):
    model, ids, inputs = model_and_batch("decoder")
    calls = []
    real = heads._ChunkedCrossEntropy.apply
    monkeypatch.setattr(heads._ChunkedCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    model(ids, **inputs, return_logits=False)  # 120 rows × 300 logits: far below one chunk
    assert calls == []
    monkeypatch.setattr(heads, "LOSS_CHUNK", VOCAB * 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, **inputs, return_logits=False)
    assert calls == []
    model(ids, **inputs, return_logits=False)
    assert calls == [1]


def test_no_target_at_all_gives_nan_as_cross_entropy_does(small_chunks):
    model, ids, inputs = model_and_batch("decoder")
    inputs["labels"] = torch.full_like(ids, -100)
    assert math.isnan(F.cross_entropy(torch.zeros(2, 3), torch.tensor([-100, -100])).item())
    assert math.isnan(model(ids, **inputs, return_logits=False).loss.item())
    with torch.no_grad():
        assert math.isnan(model(ids, **inputs, return_logits=False).loss.item())


def test_second_derivatives_are_refused_not_wrong(small_chunks):
    """A gradient penalty (create_graph=True) through the chunked loss would see its stored
    gradients as constants: it must raise, not return second derivatives with terms missing."""
    model, ids, inputs = model_and_batch("decoder")
    loss = model(ids, **inputs, return_logits=False).loss
    norm = model.decoder.final_norm.weight
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, norm, create_graph=True)
