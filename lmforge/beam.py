"""Beam search for encoder-decoder models (and decoders), batched, with transformers' semantics.

Each source keeps `num_beams` running hypotheses and `num_beams` finished ones. A step scores
every continuation of every running beam (log-probabilities, summed), keeps the 2·num_beams best,
moves those that end (EOS, or the length limit) into the finished set with their score divided by
length ** length_penalty, and continues with the num_beams best that did not end. `early_stopping`
decides when a source is done, exactly as transformers' `generate` does: True stops when
num_beams hypotheses are finished; False stops when the best running one, at its current
length, can no longer beat the worst finished one; "never" assumes the most favourable length.

What makes it fast on the CPU: the encoder runs once per source, the first step runs once per
source (its beams are all equal), cross-attention keys and values are computed once per source
and shared by its beams (the beams' queries attend to them together: model/attention.py), the
self-attention cache moves only its filled part when beams are reordered, and a source that is
done leaves the batch, so finished sources cost nothing while others run on.

    config = BeamConfig(num_beams=5, length_penalty=1.0, max_length=64)
    nbest = beam_search(model, [[12, 7, 2], [9, 2]], config, eos_token_id=2, pad_token_id=1)
    nbest[0][0].tokens, nbest[0][0].score
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate import _decoder_start, _left_pad, _right_pad

NEG = -1.0e9  # transformers' "impossible" score: added, not assigned, so the arithmetic matches


@dataclass
class BeamConfig:
    """Names and meanings follow transformers' GenerationConfig. Lengths count the decoder's
    prefix (the decoder start token, or a decoder's padded prompt) as transformers does, so
    max_length=20 allows 19 new tokens after the start token."""

    num_beams: int = 4
    length_penalty: float = 1.0  # finished scores are sum(log p) / new_tokens ** length_penalty
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice in a hypothesis (0: off)
    min_length: int = 0  # EOS is forbidden while the sequence is shorter than this
    max_length: int = 128
    max_length_ratio: float | None = None  # a: a source of n tokens gets at most int(a*n + b) new tokens
    max_length_offset: int = 10  # b
    forced_bos_token_id: int | None = None  # the first new token (BART's generation config sets 0)
    forced_eos_token_id: int | None = None  # the last token when max_length is reached
    suppress_tokens: tuple[int, ...] = ()  # never generated (Marian: its pad token)

    def __post_init__(self) -> None:
        for name in ("num_beams", "num_return_sequences", "max_length"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.num_return_sequences > self.num_beams:
            raise LmforgeError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed "
                               f"num_beams ({self.num_beams})")
        if self.early_stopping not in (True, False, "never"):
            raise LmforgeError(f"early_stopping must be True, False or 'never'; got {self.early_stopping!r}")
        if self.no_repeat_ngram_size < 0 or self.min_length < 0:
            raise LmforgeError("no_repeat_ngram_size and min_length must be >= 0")
        if self.max_length_ratio is not None and self.max_length_ratio < 0:
            raise LmforgeError(f"max_length_ratio must be >= 0; got {self.max_length_ratio}")


@dataclass
class Hypothesis:
    tokens: list[int]  # the new tokens, without the decoder start token and without the final EOS
    score: float  # sum of log-probabilities / len ** length_penalty (len counts the EOS)
    finished: bool = True  # ended with EOS (False: stopped by the length limit)


def ban_repeated_ngrams(log_probs: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """-inf for every token that would complete an n-gram already in its row of `seqs` (R, L)."""
    length = seqs.shape[1]
    if length < n:
        return
    windows = seqs.unfold(1, n, 1)  # (R, L-n+1, n)
    tail = seqs[:, length - n + 1 :]  # the last n-1 tokens of each row
    match = (windows[:, :, : n - 1] == tail[:, None, :]).all(-1)
    rows, cols = match.nonzero(as_tuple=True)
    log_probs[rows, windows[rows, cols, n - 1]] = float("-inf")


class _Search:
    """The state of one batched search: (B sources, K beams, L positions) tensors; rows leave
    the batch as their sources finish."""

    def __init__(self, config: BeamConfig, prefix: torch.Tensor, limits: torch.Tensor, eos: int | None):
        self.config, self.eos = config, eos
        B, K = prefix.shape[0], config.num_beams
        self.prefix_len, self.cur_len = prefix.shape[1], prefix.shape[1]
        width = int(limits.max())
        self.limits = limits  # (B,) each source's max_length
        self.seqs = prefix.new_full((B, K, width), 0)
        self.seqs[:, :, : self.prefix_len] = prefix[:, None, :]
        self.scores = torch.zeros(B, K, device=prefix.device)
        self.scores[:, 1:] = NEG  # the beams start equal: only the first one's continuations count
        self.fin_seqs = self.seqs.clone()
        self.fin_scores = torch.full((B, K), NEG, device=prefix.device)
        self.fin_done = torch.zeros(B, K, dtype=torch.bool, device=prefix.device)
        self.fin_len = torch.zeros(B, K, dtype=torch.long, device=prefix.device)
        self.open = torch.ones(B, dtype=torch.bool, device=prefix.device)  # the early-stop test still fails
        self.ids = torch.arange(B, device=prefix.device)  # each row's place in the caller's batch
        self.out: list[list[Hypothesis] | None] = [None] * B
        self.keep = 2 * K  # enough that K stay running when K end at once

    def process(self, log_probs: torch.Tensor) -> torch.Tensor:
        """transformers' logits processors, in its order, on (B*K, V) log-probabilities."""
        c, cur = self.config, self.cur_len
        seqs = self.seqs[:, :, :cur].flatten(0, 1)
        if c.no_repeat_ngram_size:
            ban_repeated_ngrams(log_probs, seqs, c.no_repeat_ngram_size)
        if self.eos is not None and cur < c.min_length:
            log_probs[:, self.eos] = float("-inf")
        if c.forced_bos_token_id is not None and cur == 1:
            log_probs.fill_(float("-inf"))
            log_probs[:, c.forced_bos_token_id] = 0.0
        if c.forced_eos_token_id is not None:
            last = (self.limits - 1 == cur).repeat_interleave(c.num_beams)
            if bool(last.any()):
                log_probs[last] = float("-inf")
                log_probs[last, c.forced_eos_token_id] = 0.0
        if c.suppress_tokens:
            log_probs[:, list(c.suppress_tokens)] = float("-inf")
        return log_probs

    def step(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Advance by one token; return the parent row (flat, B*K) of each surviving beam."""
        c, K = self.config, self.config.num_beams
        B, V = self.scores.shape[0], log_probs.shape[-1]
        total = (log_probs.view(B, K, V) + self.scores[:, :, None]).view(B, K * V)
        top_scores, top_index = total.topk(min(self.keep, K * V), dim=1)
        parent, token = top_index // V, top_index % V
        cand = self.seqs.gather(1, parent[:, :, None].expand(-1, -1, self.seqs.shape[2])).clone()
        cand[:, :, self.cur_len] = token
        ends = (self.cur_len + 1 >= self.limits)[:, None].expand_as(token)
        if self.eos is not None:
            ends = ends | (token == self.eos)
        # running: the K best that did not end
        running = top_scores + ends.float() * NEG
        best = running.topk(K, dim=1).indices
        self.seqs = cand.gather(1, best[:, :, None].expand(-1, -1, cand.shape[2]))
        self.scores = running.gather(1, best)
        rows = parent.gather(1, best) + torch.arange(B, device=parent.device)[:, None] * K
        # finished: only the K best candidates may end, scored with the length penalty
        new_len = self.cur_len + 1 - self.prefix_len
        just = ends.clone()
        just[:, K:] = False
        fin = top_scores / (new_len**c.length_penalty)
        full = self.fin_done.all(1, keepdim=True) & (c.early_stopping is True)
        fin = fin + full.float() * NEG + (~self.open[:, None]).float() * NEG + (~just).float() * NEG
        merged = torch.cat([self.fin_scores, fin], dim=1).topk(K, dim=1).indices
        self.fin_seqs = torch.cat([self.fin_seqs, cand], dim=1).gather(
            1, merged[:, :, None].expand(-1, -1, cand.shape[2]))
        self.fin_scores = torch.cat([self.fin_scores, fin], dim=1).gather(1, merged)
        self.fin_done = torch.cat([self.fin_done, just], dim=1).gather(1, merged)
        lengths = torch.full_like(token, new_len)
        self.fin_len = torch.cat([self.fin_len, lengths], dim=1).gather(1, merged)
        self.cur_len += 1
        self._update_open()
        self.all_ended = ends.all(1)
        return rows.flatten()

    def _update_open(self) -> None:
        """transformers' test: can the best running beam still beat the worst finished one?"""
        c = self.config
        if c.early_stopping == "never" and c.length_penalty > 0.0:
            lengths = [(limit - self.prefix_len) ** c.length_penalty for limit in self.limits.tolist()]
            best = self.scores[:, 0] / torch.tensor(lengths, device=self.scores.device)
        else:
            best = self.scores[:, :1] / ((self.cur_len - self.prefix_len) ** c.length_penalty)
            best = best[:, 0]
        worst = torch.where(self.fin_done, self.fin_scores.min(1, keepdim=True).values, NEG)
        self.open &= (best[:, None] > worst).any(1)

    def done(self) -> torch.Tensor:
        """(B,) sources whose finished set can no longer change."""
        full = self.fin_done.all(1) & (self.config.early_stopping is True)
        return ~self.open | full | self.all_ended

    def collect(self, done: torch.Tensor) -> None:
        n = self.config.num_return_sequences
        for row in done.nonzero().flatten().tolist():
            hyps = []
            for j in range(n):
                length = int(self.fin_len[row, j])
                start = self.prefix_len
                tokens = self.fin_seqs[row, j, start : start + length].tolist()
                ended = bool(tokens) and self.eos is not None and tokens[-1] == self.eos
                hyps.append(Hypothesis(tokens[:-1] if ended else tokens, float(self.fin_scores[row, j]), ended))
            self.out[int(self.ids[row])] = hyps

    def keep_rows(self, keep: torch.Tensor) -> None:
        for name in ("seqs", "scores", "fin_seqs", "fin_scores", "fin_done", "fin_len", "open", "ids", "limits"):
            setattr(self, name, getattr(self, name)[keep])


def _limits(config: BeamConfig, sources: list[list[int]], prefix_len: int, window: int | None) -> torch.Tensor:
    """Each source's max_length: the config's, or less by max_length_ratio; never past the
    model's position table (the last input token sits at max_length - 2)."""
    limits = []
    for source in sources:
        limit = config.max_length
        if config.max_length_ratio is not None:
            limit = min(limit, prefix_len + int(config.max_length_ratio * len(source) + config.max_length_offset))
        if window is not None:
            limit = min(limit, window + 1)
        if limit <= prefix_len:
            raise LmforgeError(f"max_length {limit} leaves no room for new tokens after {prefix_len} of prefix")
        limits.append(limit)
    return torch.tensor(limits)


class _ModelRows:
    """What the model reads besides the new tokens, kept in step with the search's rows: the
    cache, the encoder output and its mask (one row per source when the cache shares
    cross-attention among beams, one per beam otherwise), or a decoder's attention mask."""

    def __init__(self, model, cache, beams: int, memory=None, memory_mask=None, attention=None):
        self.model, self.cache, self.beams = model, cache, beams
        self.memory, self.memory_mask, self.attention = memory, memory_mask, attention
        self.shared = hasattr(cache, "reorder_beams")  # lmforge's Transformer: cross K/V per source

    def log_probs(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """(rows, V) float32 log-probabilities of the token after `tokens` (rows, T), the sequence
        being `length` tokens long with them; what came before is in the cache."""
        if self.memory is None:
            out = self.model(tokens, attention_mask=self.attention[:, :length], cache=self.cache, last_only=True)
        else:
            out = self.model(None, self.memory_mask, decoder_input_ids=tokens, cache=self.cache,
                             encoder_output=self.memory, last_only=True)
        return out.logits[:, -1].float().log_softmax(-1)

    def expand(self) -> None:
        """From one row per source (the first step) to one row per beam."""
        rows = torch.arange(self.cache_rows, device=self.cache_device).repeat_interleave(self.beams)
        self._reorder(rows)
        if self.memory is not None and not self.shared:
            self.memory, self.memory_mask = self.memory[rows], self.memory_mask[rows]
        if self.attention is not None:
            self.attention = self.attention[rows]

    def pick(self, rows: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        """Keep the rows `rows` (the surviving beams); `sources`: the sources still searching,
        when some have left."""
        self._reorder(rows, sources)
        if sources is None:
            return
        if self.memory is not None and self.shared:
            self.memory, self.memory_mask = self.memory[sources], self.memory_mask[sources]
        elif self.memory is not None:  # one row per beam: keep the surviving sources' beams
            self.memory = self.memory.unflatten(0, (-1, self.beams))[sources].flatten(0, 1)
            self.memory_mask = self.memory_mask.unflatten(0, (-1, self.beams))[sources].flatten(0, 1)
        if self.attention is not None:
            self.attention = self.attention.unflatten(0, (-1, self.beams))[sources].flatten(0, 1)

    def _reorder(self, rows: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        if self.shared:
            self.cache.reorder_beams(rows, sources)
        else:
            self.cache.reorder(rows)

    @property
    def cache_rows(self) -> int:
        return (self.memory if self.memory is not None else self.attention).shape[0]

    @property
    def cache_device(self) -> torch.device:
        return (self.memory if self.memory is not None else self.attention).device


@torch.no_grad()
def beam_search(
    model,
    source_ids: list[list[int]],
    config: BeamConfig,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
) -> list[list[Hypothesis]]:
    """The num_return_sequences best hypotheses of each source, best first.

    source_ids are encoder inputs for an encoder-decoder model (any model with `encode`,
    `new_cache` and a forward taking `decoder_input_ids`, `cache`, `encoder_output`, such as the
    LSTM baseline), or prompts for a decoder. Token ids default to the model's config."""
    mc = model.config
    if mc.arch == "encoder":
        raise LmforgeError("an encoder-only model does not generate text; use a decoder or encoder-decoder")
    if not source_ids or any(len(s) == 0 for s in source_ids):
        raise LmforgeError("every source needs at least one token")
    eos = mc.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (mc.pad_token_id if mc.pad_token_id is not None else 0)
    model.eval()
    device = next(model.parameters()).device
    B, K = len(source_ids), config.num_beams
    window = mc.block_size if mc.position in ("learned", "sinusoidal", "rope") else None
    if mc.arch == "decoder":
        prefix, prompt_mask = (t.to(device) for t in _left_pad(source_ids, pad))
        limits = _limits(config, source_ids, prefix.shape[1], window).to(device)
        attention = torch.ones(B, int(limits.max()), dtype=torch.long, device=device)
        attention[:, : prefix.shape[1]] = prompt_mask  # new tokens are always real
        rows = _ModelRows(model, model.new_cache(B, int(limits.max())), K, attention=attention)
    else:
        src, src_mask = (t.to(device) for t in _right_pad(source_ids, pad))
        start = _decoder_start(mc) if decoder_start_token_id is None else decoder_start_token_id
        prefix = torch.full((B, 1), start, dtype=torch.long, device=device)
        limits = _limits(config, source_ids, 1, window).to(device)
        cache = model.new_cache(B, int(limits.max()))
        rows = _ModelRows(model, cache, K, memory=model.encode(src, src_mask), memory_mask=src_mask)
    search = _Search(config, prefix, limits, eos)
    log_probs = rows.log_probs(prefix, prefix.shape[1]).repeat_interleave(K, 0)  # its beams are equal
    rows.expand()
    while True:
        parents = search.step(search.process(log_probs))
        done, sources = search.done(), None
        if bool(done.any()):  # done sources leave the batch
            search.collect(done)
            if bool(done.all()):
                return search.out
            sources = (~done).nonzero().flatten()
            parents = parents.view(-1, K)[sources].flatten()
            search.keep_rows(~done)
        rows.pick(parents, sources)
        log_probs = rows.log_probs(search.seqs[:, :, search.cur_len - 1].reshape(-1, 1), search.cur_len)


def beam_search_texts(model, tokenizer, texts: list[str], config: BeamConfig,
                      target_tokenizer=None) -> list[list[tuple[str, float]]]:
    """Texts in, the n best (text, score) of each out. `target_tokenizer` decodes the output
    when the two sides have vocabularies of their own (Marian's source.spm and target.spm)."""
    target = target_tokenizer or tokenizer
    found = beam_search(model, tokenizer.encode_batch(list(texts)), config,
                        eos_token_id=target.eos_id if target.eos_id is not None else model.config.eos_token_id,
                        pad_token_id=target.pad_id)
    return [[(target.decode(h.tokens), h.score) for h in hyps] for hyps in found]
