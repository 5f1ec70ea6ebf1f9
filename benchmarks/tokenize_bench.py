"""Tokenisation throughput on ~30 MB of text: load + clean, BPE training, encoding into the cache.

The corpus is the standard library's Python sources, repeated and trimmed to 30 MB and written
as files to a temporary folder, so the figures include real file reading. Prints one JSON object.
Run: PYTHONPATH=. .venv/bin/python benchmarks/tokenize_bench.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from lmforge.data import build_token_stores, load_corpus, stdlib_source_files
from lmforge.tokenize import Tokenizer

TARGET_BYTES = 30_000_000
VOCAB_SIZE = 8192


def write_corpus(folder: Path, target: int) -> int:
    """Copy stdlib sources into `folder` round-robin until `target` bytes; returns bytes written."""
    folder.mkdir(parents=True)
    sources = stdlib_source_files()
    written = 0
    for i in range(10**6):
        if written >= target:
            break
        data = sources[i % len(sources)].read_bytes()[: target - written]
        data = data.decode("utf-8", errors="ignore").encode("utf-8")  # a cut may split a character
        (folder / f"{i:06d}.py").write_bytes(data)
        written += len(data)
    return written


class Phase:
    """Wall time and process CPU time (all threads) of a block: on a shared machine the CPU
    figure shows the real cost even when the wall time is inflated by other jobs."""

    def __enter__(self) -> Phase:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        corpus_bytes = write_corpus(Path(tmp, "corpus"), TARGET_BYTES)
        with Phase() as load:
            documents, stats = load_corpus([Path(tmp, "corpus")])
        with Phase() as train_tok:
            tokenizer = Tokenizer.train("bpe", documents, vocab_size=VOCAB_SIZE)
        with Phase() as encode:
            train, val = build_token_stores(documents, tokenizer, cache_dir=Path(tmp, "cache"))
        with Phase() as cached:
            build_token_stores(documents, tokenizer, cache_dir=Path(tmp, "cache"))

    tokens = len(train) + len(val)
    print(json.dumps({
        "bytes": corpus_bytes,
        "files": stats.files,
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "load_clean_s": round(load.wall, 3),
        "tokenizer_train_s": round(train_tok.wall, 3),
        "tokenizer_train_cpu_s": round(train_tok.cpu, 3),
        "vocab_size": tokenizer.vocab_size,
        "encode_store_s": round(encode.wall, 3),
        "encode_store_cpu_s": round(encode.cpu, 3),
        "tokens": tokens,
        "bytes_per_token": round(stats.bytes / tokens, 3),
        "tokens_per_s": round(tokens / encode.wall),
        "cache_hit_s": round(cached.wall, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
