"""Corpus loading, token stores and their cache, batch samplers and pretraining corruptions."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from lmforge.data import (
    TokenStore,
    WindowSampler,
    build_token_stores,
    clean_text,
    corrupt_spans,
    default_cache_dir,
    eval_windows,
    load_corpus,
    mask_tokens,
    resolve_paths,
    stdlib_source_files,
)
from lmforge.errors import LmforgeError
from lmforge.tokenize import Tokenizer

DOCS = [
    "First document.\nIt has two lines.\n",
    "Second: ünïcödé, 日本語, emoji 😀.\n",
    "third\tone with tabs\n" * 30,
    "short",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train("bpe", DOCS * 3, vocab_size=320)


def _write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


# ----------------------------------------------------------------------------- corpus


def test_resolve_paths_file_folder_glob_and_dedup(tmp_path) -> None:
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deep/d.md", ".hidden.txt", ".git/config", "sub/.e.txt"]:
        _write(tmp_path / name, "x")
    folder = resolve_paths([tmp_path])
    assert folder == [tmp_path / n for n in ["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.md"]]
    assert resolve_paths([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_paths([str(tmp_path / "**" / "*.md")]) == [tmp_path / "sub/deep/d.md"]
    assert resolve_paths([str(tmp_path / "[b-z].t?t")]) == [tmp_path / "b.txt"]
    b, pattern = tmp_path / "b.txt", str(tmp_path / "*.t?t")
    repeated = resolve_paths([b, tmp_path / "sub", b, pattern])
    assert repeated == [tmp_path / n for n in ["b.txt", "sub/c.txt", "sub/deep/d.md", "a.txt"]]
    assert resolve_paths([tmp_path / ".hidden.txt"]) == [tmp_path / ".hidden.txt"]  # named explicitly


def test_resolve_paths_errors(tmp_path) -> None:
    with pytest.raises(LmforgeError, match=r"no such file or folder: .*nope\.txt"):
        resolve_paths([tmp_path / "nope.txt"])
    with pytest.raises(LmforgeError, match=r"pattern matched no files: .*\*\.zzz"):
        resolve_paths([str(tmp_path / "*.zzz")])


def test_clean_text() -> None:
    assert clean_text("e\u0301") == "\u00e9"
    assert clean_text("a\r\nb\rc\nd") == "a\nb\nc\nd"
    assert clean_text("tab\there\x00\x07\x1b[0m\x7f\x9b\ufeffok\n") == "tab\there[0mok\n"
    assert clean_text("line\u2028sep\x85nel") == "line\nsep\nnel"
    assert clean_text("keeps 😀 and 日本 and zwj 👩\u200d👩") == "keeps 😀 and 日本 and zwj 👩\u200d👩"


def test_load_corpus_skips_and_counts(tmp_path) -> None:
    _write(tmp_path / "a.txt", "hello\r\nworld\n")
    _write(tmp_path / "b.bin", b"\x89PNG\x00\x01\x02")
    _write(tmp_path / "c.txt", b"caf\xe9 latin-1")
    _write(tmp_path / "d.txt", b"\xef\xbb\xbfbom text")
    _write(tmp_path / "e.txt", "\x01\x02\r \t")  # nothing but whitespace once cleaned
    _write(tmp_path / "f.txt", "hello\nworld\n")  # same as a.txt once cleaned
    docs, stats = load_corpus([tmp_path])
    assert docs == ["hello\nworld\n", "bom text", "hello\nworld\n"]
    assert (stats.files, stats.documents, stats.skipped_binary, stats.skipped_undecodable) == (6, 3, 1, 1)
    assert stats.skipped_empty == 1 and stats.duplicates_removed == 0
    assert stats.chars == sum(map(len, docs)) and stats.bytes == sum(len(d.encode()) for d in docs)
    assert "6 files" in stats.summary() and "1 binary skipped" in stats.summary()
    docs, stats = load_corpus([tmp_path], dedup=True)
    assert docs == ["hello\nworld\n", "bom text"] and stats.duplicates_removed == 1


def test_load_corpus_nothing_usable(tmp_path) -> None:
    for i in range(3):
        _write(tmp_path / "data" / f"{i}.bin", b"\x00\x01")
    _write(tmp_path / "data" / "x.txt", b"\xff\xfe")
    with pytest.raises(LmforgeError, match=r"no usable text in .*data: 3 binary and 1 undecodable file\(s\)"):
        load_corpus([tmp_path / "data"])


def test_stdlib_source_files() -> None:
    files = stdlib_source_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert any(f.name == "os.py" for f in files)
    banned = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__"}
    assert not any(banned & set(f.parts) for f in files)


# ----------------------------------------------------------------------------- token stores


def test_default_cache_dir_follows_env(tmp_path) -> None:
    assert default_cache_dir() == tmp_path / "cache"


def test_store_round_trip_and_split(bpe: Tokenizer) -> None:
    train, val = build_token_stores(DOCS, bpe, val_fraction=0.25)
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == np.uint16
    everything = np.concatenate([train.tokens, val.tokens])
    assert bpe.decode(everything) == "".join(DOCS)
    expected = [t for doc in DOCS for t in [*bpe.encode(doc), bpe.eos_id]]
    assert everything.tolist() == expected
    assert len(val) == round(len(expected) * 0.25) and len(train) == len(expected) - len(val)
    assert train.n_bytes + val.n_bytes == sum(len(d.encode()) for d in DOCS)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_single_document_cut_is_byte_exact(kind: str) -> None:
    text = "Ünïcode line with 日本語 and 😀 emoji.\n" * 40
    tok = Tokenizer.train(kind, [text], vocab_size=300 if kind == "bpe" else None)
    train, val = build_token_stores([text], tok, val_fraction=0.1)
    assert len(val) == round((len(tok.encode(text)) + 1) * 0.1)
    assert train.n_bytes + val.n_bytes == len(text.encode())
    if kind == "char":  # every token is one character: both sides decode exactly
        assert train.n_bytes == len(tok.decode(train.tokens).encode())
    else:  # a BPE token may end inside a character; its bytes still count exactly
        lengths = tok.token_byte_lengths()
        assert train.n_bytes == int(lengths[np.asarray(train.tokens, dtype=np.int64)].sum())


def test_explicit_val_documents(bpe: Tokenizer) -> None:
    val_docs = ["held out ✓", "another one"]
    train, val = build_token_stores(DOCS, bpe, val_documents=val_docs)
    assert bpe.decode(train.tokens) == "".join(DOCS) and bpe.decode(val.tokens) == "".join(val_docs)
    assert train.n_bytes == sum(len(d.encode()) for d in DOCS)
    assert val.n_bytes == len("held out ✓".encode()) + len("another one")


def test_cache_hit_skips_encoding_and_partial_cache_is_rebuilt(tmp_path, bpe: Tokenizer, monkeypatch) -> None:
    first_train, first_val = build_token_stores(DOCS, bpe)
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    def refuse(texts):
        raise AssertionError("encoded again despite a cached result")

    monkeypatch.setattr(bpe, "encode_batch", refuse)
    train, val = build_token_stores(DOCS, bpe)
    assert train.tokens.tolist() == first_train.tokens.tolist() and val.n_bytes == first_val.n_bytes

    (folder / "meta.json").unlink()  # as if killed before the last write
    calls = []

    def count(texts):
        calls.append(len(texts))
        return Tokenizer.encode_batch(bpe, texts)

    monkeypatch.setattr(bpe, "encode_batch", count)
    train, _ = build_token_stores(DOCS, bpe)
    assert calls and train.tokens.tolist() == first_train.tokens.tolist()
    assert (folder / "meta.json").exists()
    build_token_stores(DOCS[:-1], bpe)  # different content: a different cache entry
    assert len(list((tmp_path / "cache").iterdir())) == 2


class _HugeVocab:
    """A stand-in tokenizer whose ids need 32 bits: one id per character, above 65535."""

    vocab_size = 70_000
    eos_id = 69_999

    def encode_batch(self, texts):
        return [[66_000 + ord(c) % 1000 for c in t] for t in texts]

    def to_json(self) -> str:
        return "huge-vocab-stub"


def test_store_uses_uint32_for_large_vocab() -> None:
    train, val = build_token_stores(["abc", "defg"], _HugeVocab(), val_fraction=0.3)
    assert train.tokens.dtype == np.uint32
    stream = np.concatenate([train.tokens, val.tokens]).tolist()
    assert stream == [66_097, 66_098, 66_099, 69_999, 66_100, 66_101, 66_102, 66_103, 69_999]
    assert len(val) == 3 and train.n_bytes + val.n_bytes == 7


def test_store_errors(bpe: Tokenizer) -> None:
    with pytest.raises(LmforgeError, match="fraction"):
        build_token_stores(DOCS, bpe, val_fraction=1.0)
    with pytest.raises(LmforgeError, match="no documents"):
        build_token_stores([], bpe)


# ----------------------------------------------------------------------------- samplers


def _counting_store(n: int) -> TokenStore:
    return TokenStore(np.arange(n, dtype=np.uint32), n)  # token i == position i


def test_window_sampler_batches_are_shifted_slices() -> None:
    sampler = WindowSampler(_counting_store(1000), block_size=16, batch_size=8, seed=0)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous run of the store
        assert int(y.max()) <= 999


def test_window_sampler_is_reproducible_and_resumable() -> None:
    store = _counting_store(5000)
    a = WindowSampler(store, 32, 4, seed=7)
    b = WindowSampler(store, 32, 4, seed=7)
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    resumed = WindowSampler(store, 32, 4, seed=999)
    resumed.load_state_dict(state)
    for ex, got in zip(expected, (resumed.next_batch() for _ in range(5)), strict=True):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])
    assert not torch.equal(WindowSampler(store, 32, 4, seed=8).next_batch()[0], expected[0][0])


def test_window_sampler_ranks_draw_disjoint_windows() -> None:
    store = _counting_store(300)
    ranks = [WindowSampler(store, 8, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        starts = [set(s.next_batch()[0][:, 0].tolist()) for s in ranks]
        assert len(starts[0]) == len(starts[1]) == 16 and not starts[0] & starts[1]


def test_window_sampler_too_short() -> None:
    message = ("corpus has 10 tokens, fewer than one context window of block_size+1 = 11; "
               "lower --block-size (or --seq-len) or add text")
    with pytest.raises(LmforgeError, match=re.escape(message)):
        WindowSampler(_counting_store(10), block_size=10, batch_size=2, seed=0)


def test_eval_windows_predict_every_token_once() -> None:
    store = _counting_store(103)
    targets = []
    for x, y in eval_windows(store, block_size=10, batch_size=4):
        assert x.shape[1] == y.shape[1] == 10
        real = y != -100
        assert torch.equal(x[real] + 1, y[real])  # inputs precede their targets
        targets += y[real].tolist()
    assert sorted(targets) == list(range(1, 103))


def test_eval_windows_max_batches_spread_over_store() -> None:
    store = _counting_store(10_001)
    batches = list(eval_windows(store, block_size=10, batch_size=4, max_batches=3))
    assert len(batches) == 3
    firsts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert len(firsts) == 12 and firsts == sorted(set(firsts)) and firsts[-1] > 9000
    again = list(eval_windows(store, block_size=10, batch_size=4, max_batches=3))
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ----------------------------------------------------------------------------- corruptions


def test_mask_tokens_proportions_and_specials() -> None:
    gen = torch.Generator().manual_seed(0)
    specials, mask_id, vocab = [0, 1, 2], 2, 1000
    ids = torch.randint(3, vocab, (64, 256), generator=gen)
    ids[:, ::16] = 0  # special tokens sprinkled in: never chosen
    inputs, labels = mask_tokens(ids, mask_id, vocab, 0.15, gen, special_ids=specials)
    chosen = labels != -100
    eligible = ids != 0
    assert torch.equal(labels[chosen], ids[chosen]) and not chosen[~eligible].any()
    assert torch.equal(inputs[~chosen], ids[~chosen])
    rate = chosen.sum().item() / eligible.sum().item()
    assert 0.13 < rate < 0.17
    n = chosen.sum().item()
    masked = (inputs[chosen] == mask_id).sum().item() / n
    unchanged = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = inputs[chosen][(inputs[chosen] != mask_id) & (inputs[chosen] != ids[chosen])]
    assert 0.76 < masked < 0.84 and 0.07 < unchanged < 0.13 and 0.07 < len(replaced) / n < 0.13
    assert not torch.isin(replaced, torch.tensor(specials)).any()


def test_mask_tokens_at_least_one_per_row() -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (32, 20), generator=gen)
    ids[:, :10] = 1
    _, labels = mask_tokens(ids, 3, 50, 0.001, gen, special_ids=[1, 3])
    per_row = (labels != -100).sum(dim=1)
    assert (per_row >= 1).all() and (labels[:, :10] == -100).all()


def test_corrupt_spans_replaces_each_span_with_one_mask() -> None:
    gen = torch.Generator().manual_seed(2)
    batch, length, mask_id = 16, 100, -7  # ids 0..99 are all distinct, so spans are recoverable
    ids = torch.arange(length).repeat(batch, 1)
    out = corrupt_spans(ids, mask_id, 0.3, gen, mean_span=3.0)
    assert out.shape[0] == batch and out.shape[1] < length
    lengths = []
    for row in out.tolist():
        row = [t for t in row if t != -1]
        assert length - sum(t != mask_id for t in row) == 30  # exactly round(prob * T) tokens hidden
        pos, after_mask = 0, False  # pos: the next original id not yet accounted for
        for t in row:
            if t == mask_id:
                assert not after_mask  # one mask per span: never two in a row
                after_mask = True
            else:  # a kept token follows a mask iff ids were skipped
                assert t > pos if after_mask else t == pos
                pos, after_mask = t + 1, False
        assert pos < length if after_mask else pos == length
        lengths.append(len(row))
    assert len(set(lengths)) > 1 and out.shape[1] == max(lengths)
    assert (out == -1).sum().item() == sum(out.shape[1] - n for n in lengths)


def test_store_files_are_not_writable_views(bpe: Tokenizer) -> None:
    train, _ = build_token_stores(DOCS, bpe)
    assert not train.tokens.flags.writeable
    assert os.path.basename(train.tokens.filename) == "train.bin"
