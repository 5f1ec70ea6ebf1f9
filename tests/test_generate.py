"""Generation: logit filters (checked against transformers where it imports), greedy decoding
against cache-free full forward passes, left-padded batches, seeds, stop strings, streaming of
multi-byte characters, max_new_tokens, eos, encoder-decoder generation and config validation.

Models are random (no training), untied (a random tied model mostly repeats its input token)
with init_std 0.2 so that logits spread out and the argmax is never a near-tie. Where a test
needs a model to say something specific, its forward is wrapped to force the next token
("scripted").
"""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
from helpers import ENGLISH, one_thread, token_cache  # noqa: F401  (fixtures are registered by import)

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generate import (
    GenerationConfig,
    _TextTracker,
    apply_repetition_penalty,
    decode_steps,
    generate,
    min_p_filter,
    pick_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmforge.model import LanguageModel
from lmforge.tokenize import Tokenizer

NEG = float("-inf")
MULTIBYTE = "héllo wörld, naïve café — 日本語のテキスト 🙂🚀 ok\n"


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train("char", [ENGLISH + string.ascii_letters + string.digits + string.punctuation])


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return Tokenizer.train("bpe", [MULTIBYTE * 20, ENGLISH], vocab_size=300)


def make_model(tokenizer: Tokenizer | None = None, vocab: int = 40, arch: str = "decoder", seed: int = 0,
               **overrides) -> LanguageModel:
    ids = {}
    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        ids = dict(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, mask_token_id=tokenizer.mask_id,
                   bos_token_id=tokenizer.bos_id, decoder_start_token_id=tokenizer.eos_id)
    kw = dict(arch=arch, vocab_size=vocab, block_size=48, n_layer=2, n_head=2, n_embd=32, init_std=0.2,
              relative_distance=8, tie_embeddings=False, **ids)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(**kw)).eval()


def ban(model: LanguageModel, token_ids) -> LanguageModel:
    """Never predict these ids (e.g. the special tokens, so random models write plain text)."""
    real = model.forward
    banned = list(token_ids)

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[..., banned] = NEG
        return out

    model.forward = forward
    return model


def scripted(model: LanguageModel, rows: list[list[int]]) -> LanguageModel:
    """Force row i's k-th generated token to be rows[i][k] (the k-th call of forward)."""
    real = model.forward
    calls = [0]

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        k = calls[0]
        calls[0] += 1
        forced = torch.full_like(out.logits, -1e4)
        for i, row in enumerate(rows):
            forced[i, :, row[min(k, len(row) - 1)]] = 0.0
        out.logits = forced
        return out

    model.forward = forward
    return model


def fixed_logits(model: LanguageModel, logits: torch.Tensor) -> LanguageModel:
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits = logits.expand_as(out.logits).clone()
        return out

    model.forward = forward
    return model


def run_steps(model, prompts, config, **kw) -> list[list[int]]:
    """decode_steps collected per row."""
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens, _done in decode_steps(model, prompts, config, **kw):
        for row, token in zip(rows, tokens, strict=True):
            row.append(token)
    return rows


def manual_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding by full forward passes over the whole sequence, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def manual_greedy_seq2seq(model, source: list[int], n: int) -> list[int]:
    target = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([source]), decoder_input_ids=torch.tensor([target])).logits
            target.append(int(logits[0, -1].argmax()))
    return target[1:]


GREEDY = dict(temperature=0.0)


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE's base alphabet), so characters are split."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs), strict=True))
    ids = [tokenizer.token_to_id(table[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


# --------------------------------------------------------------------------- logit filters


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    kept = torch.isfinite(top_k_filter(logits, 3))
    assert kept.tolist() == [[False, True, False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 3)[kept], logits[kept])  # kept values untouched
    assert torch.isfinite(top_k_filter(logits, 100)).all()  # k above the vocabulary keeps all
    assert torch.isfinite(top_k_filter(logits, 1)).sum() == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()[0]  # noqa: E731
    assert keep(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert keep(0.6) == [False, True, False, True]  # 0.5 + 0.3
    assert keep(0.85) == [False, True, True, True]  # 0.5 + 0.3 + 0.15 = 0.95
    assert keep(0.97) == [True, True, True, True]
    assert keep(1e-6) == [False, True, False, False]  # never empty


def logits_with_exact_softmax(probs: list[float], reach: int = 8) -> torch.Tensor:
    """(1, V) float32 logits whose softmax is exactly `probs` (powers of two summing to 1), in the
    given order and sorted either way. The likeliest token gets logit 0 (exp(0) = 1 exactly) and
    the others log(p / max p), which a correctly rounded exp maps back exactly; a faster vectorised
    exp may be an ulp off on some CPU, so neighbouring floats of those logits are tried too."""
    top = max(probs)
    values = sorted(set(probs) - {top})
    centre = torch.tensor([math.log(v / top) for v in values]).view(torch.int32)
    target = torch.tensor([probs])
    for step in sorted(itertools.product(range(-reach, reach + 1), repeat=len(values)), key=lambda s: max(map(abs, s))):
        logit = dict(zip(values, (centre + torch.tensor(step, dtype=torch.int32)).view(torch.float32).tolist(),
                         strict=True))
        logits = torch.tensor([[logit.get(p, 0.0) for p in probs]])
        if all(torch.equal(logits.sort(descending=d).values.softmax(-1), target.sort(descending=d).values)
               for d in (True, False)) and torch.equal(logits.softmax(-1), target):
            return logits
    raise AssertionError(f"no float32 logits give exactly {probs} through softmax on this CPU")


def test_top_p_at_an_exact_tie_keeps_the_tokens_that_reach_p():
    """When the top tokens' mass equals p exactly they already reach it: the smallest set reaching
    p is them, and the next token is dropped. transformers' TopPLogitsWarper agrees: it drops the
    tokens whose ascending cumulative mass is <= 1 - p, and 0.125 + 0.125 <= 0.25."""
    probs = [0.125, 0.5, 0.125, 0.25]  # out of order: the mask must be scattered back to token ids
    logits = logits_with_exact_softmax(probs)
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()[0]  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone is exactly 0.5
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.25 is exactly 0.75
    assert kept(0.75 - 2**-20) == [False, True, False, True]
    assert sum(kept(0.75 + 2**-20)) == 3  # just past the tie: one 0.125 more (either: they tie)
    assert sum(kept(0.875)) == 3  # exactly 0.5 + 0.25 + 0.125
    assert kept(1.0) == [True, True, True, True]
    transformers = pytest.importorskip("transformers")
    input_ids = torch.zeros(1, 1, dtype=torch.long)
    for p in (0.5, 0.75, 1.0):
        hf = transformers.TopPLogitsWarper(top_p=p)(input_ids, logits.clone())
        assert torch.isfinite(hf).tolist()[0] == kept(p), p
    for p in (0.75 + 2**-20, 0.875):
        assert int(torch.isfinite(transformers.TopPLogitsWarper(top_p=p)(input_ids, logits.clone())).sum()) == 3, p


def test_min_p_keeps_tokens_relative_to_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    kept = torch.isfinite(min_p_filter(probs.log(), 0.2)).tolist()[0]  # threshold 0.1
    assert kept == [True, True, True, False]
    assert torch.isfinite(min_p_filter(probs.log(), 1.0)).tolist()[0] == [True, False, False, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]


def test_filters_match_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    input_ids = torch.randint(0, 50, (6, 12))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, input_ids, True)

    hf = transformers.RepetitionPenaltyLogitsProcessor(1.7)(input_ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.7), hf)
    for k in (1, 5, 17):
        hf = transformers.TopKLogitsWarper(top_k=k)(input_ids, scores.clone())
        assert torch.equal(torch.isinf(top_k_filter(scores, k)), torch.isinf(hf)), k
    for p in (0.1, 0.5, 0.9, 0.99):
        hf = transformers.TopPLogitsWarper(top_p=p)(input_ids, scores.clone())
        assert torch.equal(torch.isinf(top_p_filter(scores, p)), torch.isinf(hf)), p
    for m in (0.05, 0.3):
        hf = transformers.MinPLogitsWarper(min_p=m)(input_ids, scores.clone())
        assert torch.equal(torch.isinf(min_p_filter(scores, m)), torch.isinf(hf)), m


def test_pick_next_greedy_and_filters_restrict_sampling():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.9, -1.0]]).repeat(400, 1)
    assert pick_next(logits, GenerationConfig(temperature=0), None).unique().tolist() == [2]
    gen = torch.Generator().manual_seed(0)
    drawn = pick_next(logits, GenerationConfig(temperature=1.0, top_k=2), None, gen)
    assert set(drawn.tolist()) == {2, 3}
    drawn = pick_next(logits, GenerationConfig(temperature=5.0), None, gen)
    assert set(drawn.tolist()) == {0, 1, 2, 3, 4}  # high temperature: everything is possible
    drawn = pick_next(logits, GenerationConfig(temperature=1.0, top_k=1), None, gen)
    assert drawn.unique().tolist() == [2]
    seen = torch.zeros(400, 5, dtype=torch.bool)
    seen[:, 2] = True
    greedy_penalised = pick_next(logits, GenerationConfig(temperature=0, repetition_penalty=1.5), seen)
    assert greedy_penalised.unique().tolist() == [3]  # 3.0 / 1.5 = 2.0 < 2.9


# --------------------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "relative", "sinusoidal", "none"])
def test_greedy_equals_cache_free_argmax(position):
    model = make_model(vocab=40, position=position)
    prompt = [3, 17, 5, 9, 22, 1]
    expected = manual_greedy(model, prompt, 20)
    assert run_steps(model, [prompt], GenerationConfig(max_new_tokens=20, **GREEDY)) == [expected]
    assert len(set(expected)) > 1  # a model stuck on one token would prove little


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "relative"])
def test_left_padded_batch_equals_each_prompt_alone(position):
    model = make_model(vocab=40, position=position, seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [30], [12, 2, 33, 4]]
    config = GenerationConfig(max_new_tokens=12, **GREEDY)
    batched = run_steps(model, prompts, config)
    for prompt, row in zip(prompts, batched, strict=True):
        assert run_steps(model, [prompt], config) == [row]
        assert row == manual_greedy(model, prompt, 12)


def test_greedy_text_matches_token_decoding(char_tok):
    model = ban(make_model(char_tok), char_tok.special_ids)
    prompt = "The quick"
    text = generate(model, char_tok, prompt, GenerationConfig(max_new_tokens=15, **GREEDY))
    expected = manual_greedy(model, char_tok.encode(prompt), 15)
    assert text == char_tok.decode(expected)
    assert isinstance(text, str) and len(text) == 15


def test_long_prompt_is_left_truncated_to_fit_the_window(char_tok):
    model = ban(make_model(char_tok), char_tok.special_ids)  # block_size 48
    long_prompt = ENGLISH[:200]
    config = GenerationConfig(max_new_tokens=8, **GREEDY)
    out = generate(model, char_tok, long_prompt, config)
    assert len(out) == 8
    assert out == generate(model, char_tok, long_prompt[-40:], config)  # 48 - 8 tokens are kept


def test_encoder_decoder_greedy(char_tok):
    model = ban(make_model(char_tok, arch="encoder-decoder", seed=2), char_tok.special_ids)
    sources = [char_tok.encode("the lazy dog"), char_tok.encode("a stitch in time saves nine")]
    config = GenerationConfig(max_new_tokens=10, **GREEDY)
    batched = run_steps(model, sources, config, pad_id=char_tok.pad_id)
    for source, row in zip(sources, batched, strict=True):
        assert row == manual_greedy_seq2seq(model, source, 10)
    texts = generate(model, char_tok, ["the lazy dog", "a stitch in time saves nine"], config)
    assert texts == [char_tok.decode(r) for r in batched]
    assert all(isinstance(t, str) and len(t) == 10 for t in texts)


def test_encoder_only_model_cannot_generate(char_tok):
    model = make_model(char_tok, arch="encoder")
    with pytest.raises(LmforgeError, match="encoder-only"):
        generate(model, char_tok, "hi", GenerationConfig(max_new_tokens=3))


# --------------------------------------------------------------------------- sampling and seeds


def test_seed_makes_sampling_repeatable(char_tok):
    model = ban(make_model(char_tok), char_tok.special_ids)
    config = lambda seed: GenerationConfig(max_new_tokens=30, temperature=1.0, seed=seed)  # noqa: E731
    torch.manual_seed(1)
    a = generate(model, char_tok, ["The", "A"], config(11))
    torch.manual_seed(2)  # the global RNG must not matter when a seed is given
    b = generate(model, char_tok, ["The", "A"], config(11))
    c = generate(model, char_tok, ["The", "A"], config(12))
    assert a == b
    assert a != c
    assert a != generate(model, char_tok, ["The", "A"], GenerationConfig(max_new_tokens=30, **GREEDY))


def test_repetition_penalty_in_generation(char_tok):
    model = make_model(char_tok)
    A, B, C = (char_tok.token_to_id(c) for c in "abc")
    logits = torch.full((char_tok.vocab_size,), -5.0)
    logits[A], logits[B], logits[C] = 2.0, 1.5, 1.2
    fixed_logits(model, logits)
    plain = generate(model, char_tok, "xa", GenerationConfig(max_new_tokens=3, **GREEDY))
    assert plain == "aaa"
    penalised = generate(model, char_tok, "xa", GenerationConfig(max_new_tokens=3, repetition_penalty=2.0, **GREEDY))
    assert penalised == "bca"  # the prompt's "a" counts as seen from the start


# --------------------------------------------------------------------------- stop strings, streaming


def test_stop_string_cuts_and_ends_generation(char_tok):
    text = "hello world. STOP and then much more text"
    ids = char_tok.encode(text)
    model = scripted(make_model(char_tok), [ids])
    config = GenerationConfig(max_new_tokens=40, stop=("STOP",), **GREEDY)
    steps = list(stream(model, char_tok, ["x"], config))
    assert "".join(p[0] for p in steps) == "hello world. "
    assert len(steps) == len("hello world. STOP") + 1  # no token generated after the stop (+ finish)


def test_stop_strings_in_a_batch(char_tok):
    first, second = "ab. STOP cd", "no stop here, all of it"
    model = scripted(make_model(char_tok), [char_tok.encode(first), char_tok.encode(second)])
    config = GenerationConfig(max_new_tokens=len(second), stop=("STOP", "zz"), **GREEDY)
    out = generate(model, char_tok, ["STOP in the prompt does not count", "p"], config)
    assert out == ["ab. ", second]


def test_earliest_of_several_stops_wins_and_stop_at_first_token(char_tok):
    model = scripted(make_model(char_tok), [char_tok.encode("one, two; three")])
    assert generate(model, char_tok, "x", GenerationConfig(max_new_tokens=15, stop=(";", ","), **GREEDY)) == "one"
    model = scripted(make_model(char_tok), [char_tok.encode("!abc")])
    assert generate(model, char_tok, "x", GenerationConfig(max_new_tokens=4, stop=("!",), **GREEDY)) == ""


def test_stream_pieces_equal_generate_and_never_change(char_tok):
    model = ban(make_model(char_tok, seed=3), char_tok.special_ids)
    config = GenerationConfig(max_new_tokens=25, temperature=1.0, seed=5)
    prompts = ["The quick", "A"]
    pieces = list(stream(model, char_tok, prompts, config))
    joined = ["".join(step[i] for step in pieces) for i in range(len(prompts))]
    assert joined == generate(model, char_tok, prompts, config)
    rows = run_steps(model, [char_tok.encode(p) for p in prompts], config, eos_id=char_tok.eos_id,
                     pad_id=char_tok.pad_id)
    assert joined == [char_tok.decode(r) for r in rows]


def test_stream_holds_back_split_utf8_characters(bpe_tok):
    text = MULTIBYTE
    ids = byte_token_ids(bpe_tok, text)
    assert len(ids) > len(text)  # characters really are split over several tokens
    model = scripted(make_model(bpe_tok, block_size=128), [ids])
    config = GenerationConfig(max_new_tokens=len(ids), **GREEDY)
    pieces = [step[0] for step in stream(model, bpe_tok, ["x"], config)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "" in pieces  # some steps had nothing printable yet
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert text.startswith(emitted)


def test_stream_with_merged_bpe_tokens(bpe_tok):
    ids = bpe_tok.encode(MULTIBYTE)
    model = scripted(make_model(bpe_tok, block_size=128), [ids])
    out = generate(model, bpe_tok, "x", GenerationConfig(max_new_tokens=len(ids), **GREEDY))
    assert out == MULTIBYTE


def test_stop_string_split_across_byte_tokens(bpe_tok):
    """Stop "日本" arriving one byte at a time: nothing of it may be printed."""
    text = "abc 日本 end"
    model = scripted(make_model(bpe_tok, block_size=64), [byte_token_ids(bpe_tok, text)])
    config = GenerationConfig(max_new_tokens=len(text.encode()), stop=("日本",), **GREEDY)
    pieces = [step[0] for step in stream(model, bpe_tok, ["x"], config)]
    assert "".join(pieces) == "abc "


class ByteTokenizer:
    """Stub: ids are UTF-8 bytes; decoding is lossy like byte-level BPE's."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def push_all(tracker: _TextTracker, data: bytes) -> list[str]:
    pieces = []
    for b in data:
        pieces.append(tracker.push(b))
        if tracker.stopped:
            break
    pieces.append(tracker.finish())
    return pieces


def test_text_tracker_utf8_and_stop_prefixes():
    pieces = push_all(_TextTracker(ByteTokenizer(), []), "日本🙂x".encode())
    assert "".join(pieces) == "日本🙂x"
    assert all("\ufffd" not in p for p in pieces)
    # a tail that may grow into a stop string is held back, then released when it does not
    pieces = push_all(_TextTracker(ByteTokenizer(), ["STOP"]), b"abST xyz")
    assert pieces[:4] == ["a", "b", "", ""]
    assert "".join(pieces) == "abST xyz"
    tracker = _TextTracker(ByteTokenizer(), ["STOP"])
    assert "".join(push_all(tracker, b"abSTOPcd")) == "ab" and tracker.stopped
    # a genuinely invalid byte is printed as U+FFFD once it can no longer change
    assert "".join(push_all(_TextTracker(ByteTokenizer(), []), b"a\xffb")) == "a\ufffdb"


@pytest.mark.parametrize(("text", "stop", "expected"), [("xaé yz", "aé", "x"), ("abc 日本 end", "日本", "abc ")])
def test_text_tracker_stop_string_whose_second_character_is_multibyte(text, stop, expected):
    """While the stop string's multi-byte second character is still incomplete, its first
    character may yet begin the stop string, so it must not be printed."""
    tracker = _TextTracker(ByteTokenizer(), [stop])
    assert "".join(push_all(tracker, text.encode())) == expected
    assert tracker.stopped


# --------------------------------------------------------------------------- length and eos


def test_max_new_tokens_is_respected(char_tok):
    model = ban(make_model(char_tok), char_tok.special_ids)
    config = GenerationConfig(max_new_tokens=7, temperature=1.0, seed=0)
    steps = list(decode_steps(model, [char_tok.encode("ab"), char_tok.encode("c")], config))
    assert len(steps) == 7
    outs = generate(model, char_tok, ["ab", "c"], config)
    assert [len(char_tok.encode(o)) for o in outs] == [7, 7]
    # More new tokens than the window holds: generation stops when prompt + output fill it.
    block = model.config.block_size
    long = generate(model, char_tok, "ab", GenerationConfig(max_new_tokens=block + 16, temperature=1.0, seed=0))
    assert len(char_tok.encode(long)) == block - 2


def test_eos_ends_one_row_early(char_tok):
    eos, pad = char_tok.eos_id, char_tok.pad_id
    a, b, c = (char_tok.token_to_id(x) for x in "abc")
    model = scripted(make_model(char_tok), [[a, b, eos, c, c, c], [a, b, c, a, b, c]])
    config = GenerationConfig(max_new_tokens=6, **GREEDY)
    rows = run_steps(model, [[a], [b]], config, eos_id=eos, pad_id=pad)
    assert rows[0] == [a, b, eos, pad, pad, pad]
    assert rows[1] == [a, b, c, a, b, c]
    model = scripted(make_model(char_tok), [[a, b, eos, c, c, c], [a, b, c, a, b, c]])
    assert generate(model, char_tok, ["x", "y"], config) == ["ab", "abcabc"]


def test_eos_from_the_model_stops_everything(char_tok):
    """Bias an untied head so that eos is the argmax at every position."""
    model = make_model(char_tok)
    assert model.head.proj.weight is not model.token_embedding.weight
    direction = torch.randn(32)
    with torch.no_grad():
        model.decoder.final_norm.weight.zero_()
        model.decoder.final_norm.bias.copy_(direction)  # every hidden state is `direction`
        model.head.proj.weight[char_tok.eos_id] = 10 * direction
    config = GenerationConfig(max_new_tokens=20, temperature=0.7, seed=0)
    steps = list(decode_steps(model, [char_tok.encode("ab"), char_tok.encode("xyz")], config,
                              eos_id=char_tok.eos_id, pad_id=char_tok.pad_id))
    assert len(steps) == 1 and steps[0][0] == [char_tok.eos_id] * 2
    assert generate(model, char_tok, ["ab", "xyz"], config) == ["", ""]


def test_empty_prompt_starts_from_the_separator(char_tok):
    model = ban(make_model(char_tok), char_tok.special_ids)
    config = GenerationConfig(max_new_tokens=5, **GREEDY)
    assert generate(model, char_tok, "", config) == char_tok.decode(manual_greedy(model, [char_tok.eos_id], 5))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=0.0),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
    ],
)
def test_invalid_generation_config(bad):
    with pytest.raises(LmforgeError) as caught:
        GenerationConfig(**bad)
    assert next(iter(bad)) in str(caught.value)


def test_prompts_need_tokens():
    model = make_model(vocab=40)
    with pytest.raises(LmforgeError, match="at least one token"):
        list(decode_steps(model, [[1, 2], []], GenerationConfig(max_new_tokens=2)))
