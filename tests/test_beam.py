"""Beam search: token-for-token parity with transformers' `generate`, and its own invariants.

A small random BartForConditionalGeneration is saved and converted; lmforge's beam search must
return exactly the sequences (and, within 1e-4, the scores) that transformers returns for the
same settings, on a batch of sources of different lengths, in fp32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse: tiny matrices run best on one thread)

from lmforge.beam import BeamConfig, Hypothesis, ban_repeated_ngrams, beam_search, beam_search_texts
from lmforge.errors import LmforgeError
from lmforge.interop import from_hf
from lmforge.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 300
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 20, "a cat sat on the mat, then ran off.\n" * 20]
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
BOS, PAD, EOS = 0, 1, 2
LENGTHS = [11, 5, 8, 3, 9]


@pytest.fixture(autouse=True)
def fp32():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """(transformers model, lmforge model, tokenizer): random BART whose output moves (loud
    positions) and sometimes ends early (a raised EOS logit), so that hypotheses finish at
    different steps."""
    tokenizer = Tokenizer.train("bpe", TEXTS, vocab_size=VOCAB, special_tokens=BART_SPECIALS)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=80, max_position_embeddings=64,
        scale_embedding=True, init_std=0.15, forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for side in (hf.model.encoder, hf.model.decoder):
            side.embed_positions.weight.mul_(20.0)
        hf.final_logits_bias[0, EOS] = 0.5
    folder = tmp_path_factory.mktemp("bart")
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    model, _ = from_hf(folder)
    return hf, model, tokenizer


def sources(lengths=LENGTHS, seed=3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_generate(hf, rows: list[list[int]], pad: int, **settings) -> tuple[list[list[int]], list[float] | None]:
    """transformers' sequences (without the decoder start token, trailing padding cut) and scores."""
    width = max(len(r) for r in rows)
    src = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(src)
    for i, row in enumerate(rows):
        src[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    out = hf.generate(src, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                      output_scores=True, **settings)
    scores = getattr(out, "sequences_scores", None)
    return [s[1:].tolist() for s in out.sequences], None if scores is None else scores.tolist()


def as_hf(hyp: Hypothesis, eos: int, width: int, pad: int) -> list[int]:
    tokens = hyp.tokens + ([eos] if hyp.finished else [])
    return tokens + [pad] * (width - len(tokens))


def assert_same_as_transformers(hf, model, rows, eos: int, pad: int, **settings) -> list[list[Hypothesis]]:
    ref, ref_scores = hf_generate(hf, rows, pad, **settings)
    config = BeamConfig(**{k: v for k, v in settings.items() if k != "do_sample"})
    ours = beam_search(model, rows, config, eos_token_id=eos, pad_token_id=pad)
    flat = [h for hyps in ours for h in hyps]
    assert len(flat) == len(ref) == len(rows) * config.num_return_sequences
    assert [as_hf(h, eos, len(ref[0]), pad) for h in flat] == ref
    if ref_scores is not None:
        torch.testing.assert_close(torch.tensor([h.score for h in flat]), torch.tensor(ref_scores),
                                   atol=1e-4, rtol=0)
    return ours


SETTINGS = {
    "defaults-ish": dict(num_beams=4, max_length=20),
    "early-stop": dict(num_beams=5, length_penalty=0.6, early_stopping=True, no_repeat_ngram_size=2, min_length=6,
                       max_length=25, num_return_sequences=3),
    "never": dict(num_beams=3, length_penalty=2.0, early_stopping="never", no_repeat_ngram_size=3, max_length=30,
                  num_return_sequences=2),
    "short-favoured": dict(num_beams=4, length_penalty=-0.5, early_stopping=False, min_length=3, max_length=16,
                           num_return_sequences=4),
    "forced": dict(num_beams=3, forced_bos_token_id=BOS, forced_eos_token_id=EOS, max_length=12,
                   no_repeat_ngram_size=1),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_beam_search_matches_transformers(bart, name):
    hf, model, _ = bart
    ours = assert_same_as_transformers(hf, model, sources(), EOS, PAD, **SETTINGS[name])
    if name == "early-stop":  # the sources end at different steps: rows leave the batch mid-search
        lengths = {len(hyps[0].tokens) for hyps in ours}
        assert len(lengths) > 1 and any(h.finished for hyps in ours for h in hyps)
    if name == "forced":
        assert all(h.tokens[0] == BOS and h.finished for hyps in ours for h in hyps)


def test_greedy_matches_transformers(bart):
    """num_beams=1 with early stopping is greedy search: transformers' greedy `generate`."""
    hf, model, _ = bart
    ref, _ = hf_generate(hf, sources(), PAD, num_beams=1, max_length=20)
    ours = beam_search(model, sources(), BeamConfig(num_beams=1, early_stopping=True, max_length=20),
                       eos_token_id=EOS, pad_token_id=PAD)
    assert [as_hf(hyps[0], EOS, len(ref[0]), PAD) for hyps in ours] == ref


def test_nbest_is_sorted_and_distinct(bart):
    _, model, _ = bart
    ours = beam_search(model, sources(), BeamConfig(num_beams=6, num_return_sequences=6, max_length=14),
                       eos_token_id=EOS, pad_token_id=PAD)
    for hyps in ours:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) + (h.finished,) for h in hyps}) == 6


def test_max_length_relative_to_source(bart):
    """Each source gets int(a*n + b) new tokens at most, and its result is what it gets alone
    with that absolute limit."""
    _, model, _ = bart
    rows = sources([12, 2, 7])
    config = BeamConfig(num_beams=3, min_length=40, max_length=40, max_length_ratio=0.5, max_length_offset=2)
    ours = beam_search(model, rows, config, eos_token_id=EOS, pad_token_id=PAD)
    for row, hyps in zip(rows, ours, strict=True):
        limit = int(0.5 * len(row) + 2)
        assert len(hyps[0].tokens) + hyps[0].finished == limit  # min_length keeps EOS away until the end
        alone = BeamConfig(num_beams=3, min_length=40, max_length=1 + limit)
        (single,) = beam_search(model, [row], alone, eos_token_id=EOS, pad_token_id=PAD)
        assert [(h.tokens, h.finished) for h in single] == [(h.tokens, h.finished) for h in hyps]
        assert single[0].score == pytest.approx(hyps[0].score, abs=1e-5)


def test_cross_attention_keys_and_values_are_computed_once_per_source(bart):
    """One projection of the encoder output per decoder layer for the whole search, with one row
    per source (not per beam)."""
    _, model, _ = bart
    rows_seen = []
    hooks = [block.cross_attn.kv.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
             for block in model.decoder.blocks]
    try:
        ours = beam_search(model, sources(), BeamConfig(num_beams=4, max_length=15), eos_token_id=EOS, pad_token_id=PAD)
    finally:
        for hook in hooks:
            hook.remove()
    assert max(len(h[0].tokens) for h in ours) > 5
    assert rows_seen == [len(LENGTHS)] * len(model.decoder.blocks)


class _PlainCache:
    """A cache without reorder_beams: beam search then repeats the encoder output per beam, as it
    does for any model of the encoder-decoder protocol (the LSTM baseline)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "reorder_beams":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_models_without_shared_cross_attention_decode_the_same(bart, monkeypatch):
    _, model, _ = bart
    config = BeamConfig(num_beams=3, early_stopping=True, num_return_sequences=2, max_length=18)
    shared = beam_search(model, sources(), config, eos_token_id=EOS, pad_token_id=PAD)
    original = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a: _PlainCache(original(*a)))
    plain = beam_search(model, sources(), config, eos_token_id=EOS, pad_token_id=PAD)
    assert [[h.tokens for h in hyps] for hyps in plain] == [[h.tokens for h in hyps] for hyps in shared]
    torch.testing.assert_close([[h.score for h in hyps] for hyps in plain],
                               [[h.score for h in hyps] for hyps in shared], atol=1e-5, rtol=0)


def test_texts_in_texts_out(bart):
    _, model, tokenizer = bart
    texts = ["the quick fox", "a cat sat on the mat"]
    config = BeamConfig(num_beams=3, num_return_sequences=2, max_length=12)
    found = beam_search_texts(model, tokenizer, texts, config)
    ids = beam_search(model, tokenizer.encode_batch(texts), config, eos_token_id=EOS, pad_token_id=PAD)
    assert [[text for text, _ in n] for n in found] == [[tokenizer.decode(h.tokens) for h in n] for n in ids]


def test_ngram_ban():
    seqs = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])
    log_probs = torch.zeros(2, 10)
    ban_repeated_ngrams(log_probs, seqs, 3)  # (5, 6) was followed by 7 in row 0; row 1 repeats nothing
    assert log_probs[0].isinf().nonzero().flatten().tolist() == [7]
    assert not log_probs[1].isinf().any()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences (3) cannot exceed num_beams (2)"),
        (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'; got 'sometimes'"),
        (dict(num_beams=0), "num_beams must be at least 1; got 0"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(LmforgeError) as info:
        BeamConfig(**options)
    assert str(info.value) == message


def test_empty_source_is_refused(bart):
    _, model, _ = bart
    with pytest.raises(LmforgeError, match="every source needs at least one token"):
        beam_search(model, [[5, 6], []], BeamConfig())


def test_decoder_beam_search_matches_transformers(tmp_path):
    """A decoder's prompts are left-padded as transformers pads them; lengths count the padded prompt."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.5)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    Tokenizer.train("bpe", TEXTS, vocab_size=VOCAB).save(tmp_path / "tokenizer.json")
    model, _ = from_hf(tmp_path)
    rows = sources([7, 3, 5], seed=4)
    width, pad, eos = 7, 1, 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    settings = dict(num_beams=3, no_repeat_ngram_size=2, length_penalty=0.5, early_stopping=True, max_length=18,
                    num_return_sequences=2)
    ref = hf.generate(ids, attention_mask=(torch.arange(width) >= width - torch.tensor([7, 3, 5])[:, None]).long(),
                      do_sample=False, pad_token_id=pad, return_dict_in_generate=True, output_scores=True, **settings)
    ours = [h for hyps in beam_search(model, rows, BeamConfig(**settings), eos_token_id=eos, pad_token_id=pad)
            for h in hyps]
    assert [as_hf(h, eos, ref.sequences.shape[1] - width, pad) for h in ours] == ref.sequences[:, width:].tolist()
    torch.testing.assert_close(torch.tensor([h.score for h in ours]), ref.sequences_scores, atol=1e-4, rtol=0)


def test_lstm_baseline_decodes_through_the_same_search():
    """Any model of the encoder-decoder protocol: the LSTM's cache has no shared cross-attention,
    so its encoder output is repeated per beam; a batch decodes as its sources do one by one."""
    from lmforge.config import ModelConfig
    from lmforge.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="lstm", vocab_size=50, n_embd=32, n_layer=1, block_size=64,
                                    eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, init_std=0.5)).eval()
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    config = BeamConfig(num_beams=3, num_return_sequences=2, max_length=12, early_stopping=True,
                        suppress_tokens=(PAD,))
    batch = beam_search(model, rows, config)
    assert type(model).__name__ == "LSTMSeq2Seq"
    for row, hyps in zip(rows, batch, strict=True):
        (alone,) = beam_search(model, [row], config)
        assert [h.tokens for h in alone] == [h.tokens for h in hyps] and PAD not in hyps[0].tokens
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-5)
