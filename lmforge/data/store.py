"""Tokenise a corpus once into memory-mapped token files, cached by content.

Training reads random windows of a long token stream; keeping that stream in a flat file of
uint16/uint32 ids and memory-mapping it costs almost no RAM and makes the second run of the same
data instant. The cache folder is named by a hash of everything that determines its content
(tokenizer, documents, split), so a changed input can never be served stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_write_bytes, atomic_write_text
from lmforge.errors import LmforgeError

CACHE_FORMAT = 1
ENCODE_CHUNK_CHARS = 1 << 22  # ~4M characters per encode_batch call: big enough to use all cores
SPLITS = ("train", "val")


def default_cache_dir() -> Path:
    env = os.environ.get("LMFORGE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lmforge" / "tokens"


class TokenStore:
    """One split: a read-only np.memmap of token ids plus the UTF-8 byte count of the text it
    represents (for bits per byte)."""

    def __init__(self, tokens: np.ndarray, n_bytes: int) -> None:
        self.tokens = tokens
        self.n_bytes = int(n_bytes)

    @classmethod
    def open(cls, path: Path, dtype: str, length: int, n_bytes: int) -> TokenStore:
        if length == 0:  # mmap cannot map an empty file
            return cls(np.zeros(0, dtype=dtype), n_bytes)
        return cls(np.memmap(path, dtype=dtype, mode="r", shape=(length,)), n_bytes)

    def __len__(self) -> int:
        return len(self.tokens)

    def count(self, token_id: int) -> int:
        """How often one id occurs (e.g. <unk>: text the tokenizer cannot represent)."""
        return int(np.count_nonzero(self.tokens == token_id))

    def __repr__(self) -> str:
        return f"TokenStore({len(self)} tokens, {self.n_bytes} bytes)"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def build_token_stores(
    documents: Sequence[str],
    tokenizer: Any,
    val_fraction: float = 0.1,
    val_documents: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> tuple[TokenStore, TokenStore]:
    """(train, val) token stores: each document's ids followed by the eos id, as one stream.

    Without `val_documents`, the last `val_fraction` of the stream is validation (for one file
    such as tiny shakespeare: first 90% train, last 10% val). `tokenizer` needs `encode_batch`,
    `eos_id`, `vocab_size` and `to_json`; `token_byte_lengths` is used when present.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"validation fraction must be in [0, 1); got {val_fraction}")
    if not documents:
        raise LmforgeError("no documents to tokenise")
    key = _cache_key(tokenizer, documents, val_fraction, val_documents)
    folder = Path(cache_dir or default_cache_dir()) / key
    cached = _open_cached(folder)
    if cached is not None:
        return cached

    dtype = token_dtype(tokenizer.vocab_size)
    stream, lengths = _encode_stream(documents, tokenizer, dtype)
    doc_bytes = np.array([len(d.encode("utf-8")) for d in documents], dtype=np.int64)
    if val_documents is not None:
        val, _ = _encode_stream(val_documents, tokenizer, dtype)
        train, train_bytes = stream, int(doc_bytes.sum())
        val_bytes = sum(len(d.encode("utf-8")) for d in val_documents)
    else:
        cut = len(stream) - round(len(stream) * val_fraction)
        train, val = stream[:cut], stream[cut:]
        train_bytes = _bytes_before(cut, stream, lengths, doc_bytes, tokenizer)
        val_bytes = int(doc_bytes.sum()) - train_bytes

    atomic_write_bytes(folder / "train.bin", train.tobytes())
    atomic_write_bytes(folder / "val.bin", val.tobytes())
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "documents": len(documents),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks completion
    cached = _open_cached(folder)
    assert cached is not None, f"token cache {folder} unreadable right after writing it"
    return cached


def _cache_key(tokenizer: Any, documents: Sequence[str], val_fraction: float,
               val_documents: Sequence[str] | None) -> str:
    digest = hashlib.sha256()

    def add(text: str) -> None:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))  # length prefixes keep boundaries unambiguous
        digest.update(data)

    add(f"lmforge-tokens-v{CACHE_FORMAT}")
    add(tokenizer.to_json())
    add(repr(float(val_fraction)))
    for doc in documents:
        add(doc)
    add("val" if val_documents is not None else "no-val")
    for doc in val_documents or ():
        add(doc)
    return digest.hexdigest()[:32]


def _open_cached(folder: Path) -> tuple[TokenStore, TokenStore] | None:
    """The stores of a complete cache folder, or None if it is missing, partial or corrupt."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return None
        dtype = np.dtype(meta["dtype"])
        stores = []
        for split in SPLITS:
            path, length = folder / f"{split}.bin", int(meta[f"{split}_tokens"])
            if path.stat().st_size != length * dtype.itemsize:
                return None
            stores.append(TokenStore.open(path, dtype.name, length, int(meta[f"{split}_bytes"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stores[0], stores[1]


def _encode_stream(documents: Sequence[str], tokenizer: Any,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids, each followed by eos (if the tokenizer has one), and each document's
    token count. Documents go to encode_batch in chunks so the Rust encoder runs in parallel."""
    eos = tokenizer.eos_id
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    start = 0
    while start < len(documents):
        end, chars = start, 0
        while end < len(documents) and (end == start or chars < ENCODE_CHUNK_CHARS):
            chars += len(documents[end])
            end += 1
        flat: list[int] = []
        for ids in tokenizer.encode_batch(list(documents[start:end])):
            lengths.append(len(ids))
            flat.extend(ids)
            if eos is not None:
                flat.append(eos)
        parts.append(np.array(flat, dtype=dtype))
        start = end
    return np.concatenate(parts), np.array(lengths, dtype=np.int64)


def _bytes_before(cut: int, stream: np.ndarray, lengths: np.ndarray, doc_bytes: np.ndarray,
                  tokenizer: Any) -> int:
    """UTF-8 bytes of the text represented by stream[:cut].

    Documents wholly before the cut count in full. A document the cut falls inside is shared
    by the byte length of its tokens on each side (exact for byte-level BPE), else by token
    count. Either way train + val bytes always add up to the whole corpus exactly.
    """
    sep = 0 if tokenizer.eos_id is None else 1
    starts = np.concatenate([[0], np.cumsum(lengths + sep)])  # where each document begins
    doc = int(np.searchsorted(starts, cut, side="right")) - 1
    if doc >= len(lengths):
        return int(doc_bytes.sum())
    inside = cut - int(starts[doc])
    before = int(doc_bytes[:doc].sum())
    if inside >= lengths[doc]:  # the cut is at this document's eos: it belongs to train whole
        return before + int(doc_bytes[doc])
    ids = stream[starts[doc]: starts[doc] + lengths[doc]].astype(np.int64)
    table = getattr(tokenizer, "token_byte_lengths", None)
    weights = table()[ids] if table is not None else np.ones(len(ids), dtype=np.int64)
    total = int(weights.sum())
    share = int(weights[:inside].sum()) / total if total else inside / len(ids)
    return before + round(int(doc_bytes[doc]) * share)
