"""Output heads: what turns hidden states into predictions for each objective."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.layers import ACTIVATIONS
from lmforge.model.linear import Linear
from lmforge.model.norms import make_norm

# Logits (rows × vocabulary) that vocabulary_loss computes at a time: 64 MB of float32. GPT-2's
# vocabulary at batch 8 × 1024 would otherwise hold 1.6 GB of logits, and as much again for
# their float32 copy, their log-softmax and its gradient. Below this size chunks gain nothing.
LOSS_CHUNK = 2**24
# Without gradients the logits come in tiles of rows × vocabulary columns, also 16 MB: a product
# of 1,024 rows by 4,096 vocabulary rows ran 1.3–1.4× faster than one of 333 rows by GPT-2's
# 50,257 (fewer passes over the weight, a tile of logits the log-sum-exp reads back from cache).
TILE_ROWS, TILE_COLUMNS = 1024, 4096


class LMHead(nn.Module):
    """Next-token logits; its weight may be the token embedding itself (tied, as in GPT-2).
    The optional bias is BART's final_logits_bias."""

    def __init__(self, config):
        super().__init__()
        self.proj = Linear(config.n_embd, config.target_vocab_size, bias=config.lm_head_bias)

    def tie(self, embedding: nn.Embedding) -> None:
        self.proj.weight = embedding.weight

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class MLMHead(nn.Module):
    """BERT's masked-token head: a transform (dense, activation, norm), then vocabulary logits.
    Its two linear layers keep biases whatever `bias` says, as BERT's do."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd)
        self.act = ACTIVATIONS["gelu" if config.activation == "swiglu" else config.activation]()
        self.norm = make_norm(config)
        self.proj = Linear(config.n_embd, config.vocab_size)

    def tie(self, embedding: nn.Embedding) -> None:
        self.proj.weight = embedding.weight

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(hidden))


class ClassifierHead(nn.Module):
    """One vector per sequence (pooling), then the labels' logits. Encoders follow BERT: a
    pooler (dense + tanh), dropout and a linear layer with bias. Decoders follow GPT-2's `score`:
    one linear layer without bias on the last real token. Nothing in it is tied to the vocabulary."""

    def __init__(self, config):
        super().__init__()
        self.pooling = config.pooling_mode
        self.pool = Linear(config.n_embd, config.n_embd) if config.arch == "encoder" else None
        self.dropout = nn.Dropout(config.dropout)
        self.out = Linear(config.n_embd, config.n_labels, bias=config.arch == "encoder")

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        vector = pool_sequence(hidden, attention_mask, self.pooling)
        if self.pool is not None:
            vector = torch.tanh(self.pool(vector))
        return self.out(self.dropout(vector))


class SpanHead(nn.Module):
    """Extractive QA (BERT's `qa_outputs`): a start and an end logit for every token."""

    def __init__(self, config):
        super().__init__()
        self.out = Linear(config.n_embd, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden)


def pool_sequence(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, C) → (B, C): the first token, the mean of the real tokens, or the last real token.
    Padding may sit on either side: the mask says which positions are real."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (positions * attention_mask.long()).argmax(1)  # the rightmost real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def vocabulary_loss(head: LMHead | MLMHead, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) against labels (-100: no target), the same number
    F.cross_entropy gives, without holding every logit when they would pass LOSS_CHUNK: only
    rows with a target go through the head, LOSS_CHUNK of logits at a time, and their
    gradients are taken on the way (so backward only scales them); without gradients, in tiles
    of TILE_ROWS × TILE_COLUMNS. Small vocabularies, autocast,
    torch.compile (which plans memory itself) and other projections keep the plain path."""
    proj, flat = head.proj, labels.flatten()
    plain = (flat.numel() * proj.out_features <= LOSS_CHUNK or type(proj) is not Linear
             or hidden.dtype != torch.float32 or torch.is_autocast_enabled(hidden.device.type)
             or torch.compiler.is_compiling())
    if plain:
        return token_loss(head(hidden), labels)
    keep = flat != -100
    features, targets = head.features(hidden.flatten(0, -2)[keep]), flat[keep]
    if torch.is_grad_enabled():
        rows = max(1, LOSS_CHUNK // proj.out_features)
        return _ChunkedCrossEntropy.apply(features, proj.weight, proj.bias, targets, rows)
    total = features.new_zeros(())
    for f, t in zip(features.split(TILE_ROWS), targets.split(TILE_ROWS), strict=True):
        total += _tiled_loss(f, proj.weight, proj.bias, t)
    return total / targets.numel()  # no target at all: nan, as F.cross_entropy gives


def _tiled_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of features @ weight.T + bias, TILE_COLUMNS of the vocabulary at
    a time: each tile's log-sum-exp joins a running one (logaddexp), and a target's logit is
    picked from the tile that holds it. Without gradients nothing else needs a row's logits."""
    lse, picked = None, features.new_zeros(features.shape[0])
    for start in range(0, weight.shape[0], TILE_COLUMNS):
        stop = min(start + TILE_COLUMNS, weight.shape[0])
        tile = F.linear(features, weight[start:stop], None if bias is None else bias[start:stop])
        part = torch.logsumexp(tile, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        inside = (targets >= start) & (targets < stop)
        column = (targets - start).clamp(0, stop - start - 1)
        picked += torch.where(inside, tile.gather(1, column[:, None]).squeeze(1), 0.0)
    return (lse - picked).sum()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position whose label is not -100, in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum of the rows' cross-entropies, each row's log-sum-exp) for one chunk of logits."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum(), lse


class _ChunkedCrossEntropy(torch.autograd.Function):
    """features (N, C) @ weight.T + bias → mean cross-entropy over N rows, `rows` rows at a time.
    Each chunk's softmax − one-hot becomes the gradients of features, weight and bias at once."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, rows):
        n = targets.numel()
        want_features, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_features = torch.empty_like(features) if want_features else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        total = features.new_zeros(())
        for start in range(0, n, rows):
            f, t = features[start : start + rows], targets[start : start + rows]
            logits = F.linear(f, weight, bias)
            loss, lse = _summed_loss(logits, t)
            total += loss
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(t.numel(), device=t.device), t] -= 1.0
            dlogits /= n
            if want_features:
                torch.mm(dlogits, weight, out=grad_features[start : start + rows])
            if want_weight:
                grad_weight.addmm_(dlogits.t(), f)
            if want_bias:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the stored gradients are constants
            raise RuntimeError("the chunked vocabulary loss has no second derivative; "
                               "call the model with return_logits=True for double backward")
        grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        return *grads, None, None
