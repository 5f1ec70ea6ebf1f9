"""From files on disk to training batches: corpus loading, token caches and batch samplers."""

from lmforge.data.collate import WindowSampler, corrupt_spans, eval_windows, mask_tokens
from lmforge.data.corpus import CorpusStats, clean_text, load_corpus, resolve_paths, stdlib_source_files
from lmforge.data.store import TokenStore, build_token_stores, default_cache_dir

__all__ = [
    "CorpusStats",
    "TokenStore",
    "WindowSampler",
    "build_token_stores",
    "clean_text",
    "corrupt_spans",
    "default_cache_dir",
    "eval_windows",
    "load_corpus",
    "mask_tokens",
    "resolve_paths",
    "stdlib_source_files",
]
