"""The Transformer, top to bottom: embeddings → stacks of blocks → head.

`arch` picks which stacks exist: a causal decoder (GPT), a bidirectional encoder (BERT), or
both joined by cross-attention (the original Transformer). The same Embeddings, Stack and
Block serve all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model.attention import AttentionContext, build_mask
from lmforge.model.cache import KVCache
from lmforge.model.heads import LMHead, MLMHead, token_loss, vocabulary_loss
from lmforge.model.layers import Block
from lmforge.model.linear import Linear
from lmforge.model.norms import make_norm
from lmforge.model.position import Rotary, SinusoidalPositions


class Embeddings(nn.Module):
    """Adds absolute positions and segments to token vectors when the config asks for them.

    The token table itself lives on the model: encoder, decoder and a tied head share it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.position == "learned":
            self.positions = nn.Embedding(config.block_size, config.n_embd)
        elif config.position == "sinusoidal":
            self.positions = SinusoidalPositions(config.block_size, config.n_embd, config.sinusoidal_halves)
        else:
            self.positions = None
        self.segments = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        self.norm = make_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.scale = math.sqrt(config.n_embd) if config.scale_embedding else None

    def forward(self, x, position_ids, token_type_ids=None) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids)
        if self.segments is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.segments(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class Stack(nn.Module):
    """n blocks of one kind; optional dense connections; a final norm for pre-norm models."""

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.causal = causal
        self.explicit_mask = config.position in ("relative", "alibi")
        # position tables end at block_size; relative, ALiBi and no positions extrapolate
        self.window = config.block_size if config.position in ("learned", "sinusoidal", "rope") else None
        rotary = Rotary(config.head_dim, config.block_size, config.rope_theta) if config.position == "rope" else None
        self.blocks = nn.ModuleList(Block(config, i, causal, cross, rotary) for i in range(n_layers))
        if config.dense_connections:  # layer i reads a projection of the embeddings and all i outputs
            self.dense = nn.ModuleList(
                Linear((i + 1) * config.n_embd, config.n_embd, bias=config.bias) for i in range(1, n_layers)
            )
        else:
            self.dense = None
        self.final_norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.checkpoint_blocks = False  # set by the Trainer: trade recomputation for activation memory

    def context(self, q_len: int, past: int, padding, position_ids, device) -> AttentionContext:
        if self.window is not None and past + q_len > self.window:
            raise LmforgeError(
                f"{past + q_len} positions exceed the context window of {self.window} (block_size)"
            )
        q_index = torch.arange(past, past + q_len, device=device)
        mask, is_causal = build_mask(q_index, past + q_len, self.causal, padding, self.explicit_mask)
        return AttentionContext(mask, is_causal, position_ids, q_index)

    def forward(self, x, ctx, cache: KVCache | None = None, memory=None, memory_ctx=None) -> torch.Tensor:
        outputs = [x]
        checkpointing = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        if checkpointing and self.blocks[0].attn.rotary is not None:
            # looked up here, not by the first block inside checkpoint(): torch.compile cannot
            # trace a checkpointed block that changes ctx, and broke the graph around each one
            self.blocks[0].attn.rotary_tables(ctx, x.dtype)
        for i, block in enumerate(self.blocks):
            if self.dense is not None and i > 0:
                x = self.dense[i - 1](torch.cat(outputs, dim=-1))
            layer_cache = cache.layers[i] if cache is not None else None
            if checkpointing:
                x = checkpoint(block, x, ctx, layer_cache, memory, memory_ctx, use_reentrant=False)
            else:
                x = block(x, ctx, layer_cache, memory, memory_ctx)
            if self.dense is not None:
                outputs.append(x)
        return self.final_norm(x)


def default_position_ids(attention_mask, past: int, q_len: int, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt starts at position 0."""
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, past : past + q_len]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when asked for the loss alone
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    encoder_output: torch.Tensor | None = None


class LanguageModel(nn.Module):
    """A Transformer with the head its family is trained with: next-token for decoder and
    encoder-decoder, masked-token for encoder.

    Labels are aligned with the inputs (labels[t] is the target for position t); -100 is ignored.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        # a target vocabulary of its own (Marian's separate vocabularies): the decoder and a tied head read it
        self.decoder_token_embedding = (
            nn.Embedding(config.decoder_vocab_size, config.n_embd) if config.decoder_vocab_size else None
        )
        self.encoder_embed = self.encoder = self.decoder_embed = self.decoder = None
        if config.arch in ("encoder", "encoder-decoder"):
            self.encoder_embed = Embeddings(config)
            self.encoder = Stack(config, config.n_layer, causal=False, cross=False)
        if config.arch in ("decoder", "encoder-decoder"):
            self.decoder_embed = Embeddings(config)
            n_layers = config.decoder_layers if config.arch == "encoder-decoder" else config.n_layer
            self.decoder = Stack(config, n_layers, causal=True, cross=config.arch == "encoder-decoder")
        # Prompt tuning (finetune/prompt_tuning.py): n learnt vectors (n, C) read before every input,
        # as if they were tokens. Set on a frozen model; None otherwise, and then nothing changes.
        self.register_parameter("soft_prompt", None)
        self.head = self.make_head(config)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: residual writes scaled by depth
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * self.n_blocks))
        self.tie_weights()

    @property
    def prompt_length(self) -> int:
        return 0 if self.soft_prompt is None else self.soft_prompt.shape[0]

    @property
    def max_input_tokens(self) -> int:
        """The longest input: the position window less what a soft prompt takes of it."""
        return self.config.block_size - self.prompt_length

    def _with_prompt(self, x, attention_mask, token_type_ids=None, first: bool = True):
        """Token vectors with the soft prompt before them (on the first pass; a cached step only
        extends the mask, whose cached part already covers the prompt)."""
        n = self.prompt_length
        if first:
            x = torch.cat([self.soft_prompt.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
            if token_type_ids is not None:
                token_type_ids = nn.functional.pad(token_type_ids, (n, 0))
        if attention_mask is not None:
            attention_mask = nn.functional.pad(attention_mask, (n, 0), value=1)
        return x, attention_mask, token_type_ids

    def make_head(self, config: ModelConfig) -> nn.Module:
        """The head this family trains with; a subclass with another task overrides it."""
        return MLMHead(config) if config.arch == "encoder" else LMHead(config)

    def tie_weights(self) -> None:
        """Share the token table with the head's vocabulary projection, if asked and if it has one."""
        if self.config.tie_embeddings and hasattr(self.head, "tie"):
            self.head.tie(self.target_embedding)

    @property
    def target_embedding(self) -> nn.Embedding:
        """The token table of the decoder's side."""
        return self.token_embedding if self.decoder_token_embedding is None else self.decoder_token_embedding

    @property
    def n_blocks(self) -> int:
        return sum(len(s.blocks) for s in (self.encoder, self.decoder) if s is not None)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Bidirectional pass over the whole input (encoder and encoder-decoder)."""
        x, n = self.token_embedding(input_ids), self.prompt_length
        if n:
            x, attention_mask, token_type_ids = self._with_prompt(x, attention_mask, token_type_ids)
        T = x.shape[1]
        position_ids = torch.arange(T, device=input_ids.device)[None]
        x = self.encoder_embed(x, position_ids, token_type_ids)
        ctx = self.encoder.context(T, 0, attention_mask, position_ids, input_ids.device)
        return self.encoder(x, ctx)[:, n:]

    def decode(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        encoder_output=None,
        encoder_attention_mask=None,
    ) -> torch.Tensor:
        """Causal pass; with a cache, input_ids are only the new tokens and attention_mask
        covers the cached ones too."""
        x, past = self.target_embedding(input_ids), cache.length if cache is not None else 0
        n = self.prompt_length if self.config.arch == "decoder" else 0  # an encoder-decoder prompts its encoder
        if n:
            x, attention_mask, _ = self._with_prompt(x, attention_mask, first=past == 0)
        T = x.shape[1]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, T, input_ids.device)
        x = self.decoder_embed(x, position_ids)
        ctx = self.decoder.context(T, past, attention_mask, position_ids, input_ids.device)
        memory_ctx = None
        if encoder_output is not None:
            memory_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
            memory_ctx = AttentionContext(memory_mask, False)
        hidden = self.decoder(x, ctx, cache, encoder_output, memory_ctx)
        return hidden[:, n:] if n and past == 0 else hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_output: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids feed the decoder (decoder arch) or the encoder (the other two).

        For encoder-decoder, pass decoder_input_ids; encoder_output skips re-encoding
        (generation encodes once). last_only computes logits of the final position only.
        return_logits=False (with labels) returns the loss alone, computed without holding
        every logit at once (heads.vocabulary_loss): what training and evaluation ask for.
        """
        arch = self.config.arch
        if arch == "decoder":
            hidden = self.decode(input_ids, attention_mask, position_ids, cache)
        elif arch == "encoder":
            hidden = self.encode(input_ids, attention_mask, token_type_ids)
        else:
            if encoder_output is None:
                encoder_output = self.encode(input_ids, attention_mask, token_type_ids)
            hidden = self.decode(
                decoder_input_ids, decoder_attention_mask, None, cache, encoder_output, attention_mask
            )
        if labels is not None and not return_logits:
            return ModelOutput(None, vocabulary_loss(self.head, hidden, labels), hidden, encoder_output)
        logits = self.head(hidden[:, -1:] if last_only else hidden)
        loss = None
        if labels is not None:
            loss = token_loss(logits, labels)
        return ModelOutput(logits, loss, hidden, encoder_output)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for max_len tokens of input and output (and the soft prompt's, if any)."""
        param = next(self.parameters())
        extra = self.prompt_length if self.config.arch == "decoder" else 0
        return KVCache(self.config, batch, max_len + extra, dtype=param.dtype, device=param.device)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without embedding tables."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            for embed in (self.encoder_embed, self.decoder_embed):
                if embed is not None:
                    for table in (embed.positions, embed.segments):
                        if isinstance(table, nn.Embedding):
                            total -= table.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.target_embedding.weight.numel()
            if self.decoder_token_embedding is not None:  # the source's table is only looked up
                total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matrix-product FLOPs per token (PaLM appendix B): 2N forward plus attention
        2·2·L·d·T; training (forward + backward) is three times that."""
        seq_len = seq_len or self.config.block_size
        n_matmul = self.num_parameters(exclude_embeddings=True)  # a tied table is the head's matrix
        forward = 2 * n_matmul + 4 * self.n_blocks * self.config.n_embd * seq_len
        return 3 * forward if training else forward
