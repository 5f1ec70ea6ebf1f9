"""Tokenizers: exact round trips, special ids, vocabulary limits, save/load and foreign formats."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenize import DEFAULT_SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "def f(x):\n\treturn x + 1\n",
    "Héllo wörld! naïve café, 日本語のテキスト, emoji 😀🎉\r\n",
    "  leading spaces and trailing   \n\n\n",
    "the quick brown fox jumps over the lazy dog " * 20,
]
TRICKY = [
    "",
    " ",
    "  two leading spaces",
    "a\r\nb\rc\n",
    "tabs\tand\t\ttabs",
    "emoji 👩‍👩‍👧 family and flags 🇫🇷",
    "中文字符和日本語",
    "zero\u200bwidth and e\u0301 combining",
    "\x00 nul and \x7f del",
    "ends with newline\n",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    """Characters from several scripts and planes, excluding lone surrogates (not valid text)."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x10000, 0x1000F), (0xE000, 0xE00F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train("bpe", TEXTS * 5, vocab_size=400)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return Tokenizer.train("char", TEXTS)


def test_char_round_trip_is_exact(char: Tokenizer) -> None:
    for text in TEXTS:
        ids = char.encode(text)
        assert len(ids) == len(text)  # one token per character
        assert char.decode(ids) == text
    assert char.kind == "char"


def test_char_vocab_is_specials_then_every_distinct_character(char: Tokenizer) -> None:
    specials = [*DEFAULT_SPECIAL_TOKENS, "<unk>"]
    assert [char.id_to_token(i) for i in range(len(specials))] == specials
    distinct = set("".join(TEXTS))
    assert char.vocab_size == len(specials) + len(distinct)
    assert {char.id_to_token(i) for i in range(len(specials), char.vocab_size)} == distinct


def test_char_unknown_character_is_unk(char: Tokenizer) -> None:
    ids = char.encode("aZ\u2603")
    assert ids[0] == char.token_to_id("a")
    assert ids[1:] == [char.unk_id, char.unk_id]
    assert char.decode(ids) == "a"  # <unk> is special: dropped when skipping specials
    assert char.decode(ids, skip_special_tokens=False) == "a<unk><unk>"


def test_char_recognises_literal_special_tokens(char: Tokenizer) -> None:
    ids = char.encode("de<|endoftext|>f<pad>")
    d, e, f = (char.token_to_id(c) for c in "def")
    assert ids == [d, e, char.eos_id, f, char.pad_id]


def test_char_fast_path_matches_generic_encoder(char: Tokenizer) -> None:
    rng = random.Random(1)
    texts = [_random_unicode(rng, 50) + rng.choice(TEXTS) for _ in range(30)] + ["x<mask>y"]
    expected = [char.inner.encode(t, add_special_tokens=False).ids for t in texts]
    assert char.encode_batch(texts) == expected
    assert [char.encode(t) for t in texts] == expected


def test_char_vocab_size_keeps_most_frequent() -> None:
    tok = Tokenizer.train("char", ["aaaabbbc"], vocab_size=6, special_tokens=["<pad>"])
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == ["<pad>", "<unk>", "a", "b", "c"]
    tok = Tokenizer.train("char", ["aaaabbbc"], vocab_size=4, special_tokens=["<pad>"])
    assert tok.vocab_size == 4 and tok.encode("c") == [tok.unk_id]


def test_bpe_round_trips_tricky_strings(bpe: Tokenizer) -> None:
    for text in TEXTS + TRICKY:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)


def test_bpe_round_trips_random_unicode(bpe: Tokenizer) -> None:
    rng = random.Random(1234)
    texts = [_random_unicode(rng, rng.randint(0, 60)) for _ in range(300)]
    for text, ids in zip(texts, bpe.encode_batch(texts), strict=True):
        assert bpe.decode(ids) == text, repr(text)
        assert ids == bpe.encode(text)


def test_bpe_vocab_size_honoured_and_merges_learned(bpe: Tokenizer) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    rich = Tokenizer.train("bpe", [" ".join(words[i: i + 50]) for i in range(0, 3000, 50)], vocab_size=600)
    assert rich.vocab_size == 600
    assert bpe.kind == "bpe"
    assert bpe.vocab_size <= 400  # a tiny corpus may run out of merges before the target
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))  # merges were learned
    assert [bpe.id_to_token(i) for i in range(3)] == DEFAULT_SPECIAL_TOKENS


def test_special_ids(bpe: Tokenizer, char: Tokenizer) -> None:
    assert (bpe.eos_id, bpe.pad_id, bpe.mask_id, bpe.unk_id, bpe.bos_id) == (0, 1, 2, None, None)
    assert (char.eos_id, char.pad_id, char.mask_id, char.unk_id, char.bos_id) == (0, 1, 2, 3, None)
    custom = Tokenizer.train("bpe", TEXTS, vocab_size=300, special_tokens=["[PAD]", "<s>", "</s>", "[MASK]"])
    assert (custom.pad_id, custom.bos_id, custom.eos_id, custom.mask_id) == (0, 1, 2, 3)
    assert custom.encode("a</s>") == [custom.token_to_id("a"), 2]


def test_invalid_kind_and_small_vocab_raise() -> None:
    with pytest.raises(LmforgeError, match="kind"):
        Tokenizer.train("word", TEXTS)
    with pytest.raises(LmforgeError, match="bpe vocab size 100 is too small.*259"):
        Tokenizer.train("bpe", TEXTS, vocab_size=100)
    with pytest.raises(LmforgeError, match="char vocab size 4 is too small"):
        Tokenizer.train("char", TEXTS, vocab_size=4)
    with pytest.raises(LmforgeError, match="no text"):
        Tokenizer.train("bpe", iter([]))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_identical(tmp_path, kind: str, bpe: Tokenizer, char: Tokenizer) -> None:
    tok = bpe if kind == "bpe" else char
    tok.save(tmp_path / "tokenizer.json")
    for source in (tmp_path / "tokenizer.json", tmp_path):
        loaded = Tokenizer.load(source)
        assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(TEXTS + TRICKY) == tok.encode_batch(TEXTS + TRICKY)
        assert (loaded.eos_id, loaded.pad_id, loaded.unk_id) == (tok.eos_id, tok.pad_id, tok.unk_id)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(LmforgeError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(LmforgeError, match="cannot read tokenizer"):
        Tokenizer.load(bad)


def test_load_gpt2_vocab_and_merges(tmp_path, bpe: Tokenizer) -> None:
    model = json.loads(bpe.to_json())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in model["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    gpt2 = Tokenizer.load(tmp_path)
    assert gpt2.kind == "bpe" and gpt2.vocab_size == bpe.vocab_size
    assert gpt2.encode_batch(TEXTS + TRICKY) == bpe.encode_batch(TEXTS + TRICKY)
    assert (gpt2.eos_id, gpt2.pad_id, gpt2.mask_id) == (0, 1, 2)
    assert gpt2.encode("x<|endoftext|>") == [gpt2.token_to_id("x"), 0]
    assert gpt2.decode(gpt2.encode(TRICKY[5])) == TRICKY[5]


def test_token_byte_lengths_are_exact_for_bpe(bpe: Tokenizer) -> None:
    lengths = bpe.token_byte_lengths()
    for text in TEXTS + TRICKY:
        assert sum(lengths[i] for i in bpe.encode(text)) == len(text.encode("utf-8"))
