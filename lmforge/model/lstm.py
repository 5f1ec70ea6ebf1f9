"""The recurrent baseline: an LSTM encoder-decoder with attention (Luong et al., 2015).

A bidirectional LSTM reads the source; an LSTM decoder reads the target, and each of its states
attends over the source with Luong's "general" score (h_t · W h_s). The attended context and the
state make the attentional vector tanh(W_c [h_t; c_t]), from which the tied output layer
predicts the next token. There is no input feeding (the previous attentional vector fed back as
input), so training runs the decoder LSTM over the whole target in one fused call instead of a
Python loop per step; decoding still steps one token at a time through a cache.

The model speaks the Transformer encoder-decoder's protocol (`encode`, `new_cache`, and a
forward taking `decoder_input_ids`, `cache`, `encoder_output`), so the Trainer, greedy and beam
decoding, and model folders take it as they are. `arch: "lstm"` in config.json selects it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.heads import LMHead, token_loss, vocabulary_loss
from lmforge.model.linear import Linear
from lmforge.model.transformer import ModelOutput


class LSTMCache:
    """The decoder LSTM's (h, c) between steps; `reorder` keeps the rows beam search chose."""

    def __init__(self):
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = (self.state[0].index_select(1, index), self.state[1].index_select(1, index))


class LSTMSeq2Seq(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.n_embd % 2:
            raise LmforgeError(f"an LSTM model needs an even n_embd (two directions of n_embd/2); got {config.n_embd}")
        self.config = config
        d, dropout = config.n_embd, config.dropout
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.encoder = nn.LSTM(d, d // 2, num_layers=config.n_layer, bidirectional=True, batch_first=True,
                               dropout=dropout if config.n_layer > 1 else 0.0)
        layers = config.decoder_layers
        self.decoder = nn.LSTM(d, d, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.bridge = Linear(d, 2 * d * layers)  # the source's summary → the decoder's first (h, c)
        self.score = Linear(d, d, bias=False)
        self.combine = Linear(2 * d, d, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.head = LMHead(config)
        # Embeddings at 1/sqrt(d), not the Transformer's 0.02: an LSTM has no normalisation to
        # rescale tiny inputs, and at 0.02 it trains no further than the targets' unigram loss.
        nn.init.normal_(self.token_embedding.weight, std=d**-0.5)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.head.tie(self.token_embedding)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None):
        """(B, S, n_embd) source states; padding (on the right) is packed away, so a row's
        backward direction starts at its own last token."""
        x = self.dropout(self.token_embedding(input_ids))
        if attention_mask is None:
            return self.encoder(x)[0]
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])[0]

    def _first_state(self, memory: torch.Tensor, mask: torch.Tensor | None):
        """The decoder's initial (h, c) from the mean of the source states: computed from the
        encoder output alone, which is all that beam search carries (and repeats) per hypothesis."""
        if mask is None:
            mean = memory.mean(1)
        else:
            weights = mask.to(memory.dtype)[..., None]
            mean = (memory * weights).sum(1) / weights.sum(1).clamp(min=1)
        layers, d = self.config.decoder_layers, self.config.n_embd
        h, c = torch.tanh(self.bridge(mean)).view(-1, 2, layers, d).permute(1, 2, 0, 3).unbind(0)
        return h.contiguous(), c.contiguous()

    def forward(self, input_ids=None, attention_mask=None, labels=None, decoder_input_ids=None,
                cache: LSTMCache | None = None, encoder_output=None, last_only: bool = False,
                return_logits: bool = True, **unused) -> ModelOutput:
        if decoder_input_ids is None:
            raise LmforgeError("an LSTM seq2seq model reads a source and a target; use lmforge translate or summarize")
        if encoder_output is None:
            encoder_output = self.encode(input_ids, attention_mask)
        state = cache.state if cache is not None and cache.state is not None else None
        if state is None:
            state = self._first_state(encoder_output, attention_mask)
        out, state = self.decoder(self.dropout(self.token_embedding(decoder_input_ids)), state)
        if cache is not None:
            cache.state, cache.length = state, cache.length + decoder_input_ids.shape[1]
        if last_only:
            out = out[:, -1:]
        scores = self.score(out) @ encoder_output.transpose(1, 2)  # (B, T, S)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        context = F.softmax(scores.float(), dim=-1).to(encoder_output.dtype) @ encoder_output
        hidden = self.dropout(torch.tanh(self.combine(torch.cat([out, context], dim=-1))))
        if labels is not None and not return_logits:
            return ModelOutput(None, vocabulary_loss(self.head, hidden, labels), hidden, encoder_output)
        logits = self.head(hidden)
        loss = token_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits, loss, hidden, encoder_output)

    def new_cache(self, batch: int, max_len: int) -> LSTMCache:
        return LSTMCache()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings and not self.config.tie_embeddings:
            total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """2 FLOPs per weight per token forward (attention over the source aside); 3x to train."""
        forward = 2 * self.num_parameters(exclude_embeddings=True)
        return 3 * forward if training else forward
