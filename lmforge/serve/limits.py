"""Who may call the server, how often, and what it may say.

- `Access`: optional API keys (``Authorization: Bearer KEY``) and a per-key request rate.
  Without keys every client address is its own key for the rate limit.
- `OutputFilter`: blocked words and regular expressions, masked with ``*`` (one per character,
  so offsets and token boundaries stay where they were). Streamed text is held back by
  `hold` characters, so a blocked word split across two chunks is still caught.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from pathlib import Path

from lmforge.errors import LmforgeError

REGEX_PREFIX = "re:"
REGEX_HOLD = 64  # the longest match of a blocklist regex that streaming is sure to catch


class Denied(Exception):
    """A request refused by Access: status, message, OpenAI error code, Retry-After seconds."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Access:
    def __init__(self, keys: list[str] | None = None, per_minute: int | None = None, window: float = 60.0):
        if per_minute is not None and per_minute < 1:
            raise LmforgeError(f"--rate-limit must be at least 1 request per minute; got {per_minute}")
        self.keys = set(keys or ())
        self.per_minute, self.window = per_minute, window
        self.recent: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def check(self, authorization: str | None, client: str) -> str:
        """The caller's identity (key or address); Denied with 401 or 429 otherwise."""
        who = client
        if self.keys:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in self.keys:
                raise Denied(401, "Invalid or missing API key: send the header 'Authorization: Bearer KEY'.",
                             "invalid_api_key")
            who = token.strip()
        if self.per_minute is not None:
            self._count(who)
        return who

    def _count(self, who: str) -> None:
        now = time.monotonic()
        with self.lock:
            times = self.recent.setdefault(who, deque())
            while times and now - times[0] >= self.window:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = math.ceil(self.window - (now - times[0]))
                raise Denied(429, f"Rate limit reached: {self.per_minute} requests per minute for this key.",
                             "rate_limit_exceeded", retry_after=max(1, wait))
            times.append(now)


class OutputFilter:
    def __init__(self, words: list[str] = (), patterns: list[str] = ()):
        parts = [rf"(?<!\w){re.escape(w)}(?!\w)" for w in words if w]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LmforgeError(f"blocklist regex {pattern!r} does not compile: {exc}") from None
            parts.append(f"(?:{pattern})")
        self.regex = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        # a word is decided once the character after it is known; a regex within REGEX_HOLD
        self.hold = max([len(w) + 1 for w in words if w] + ([REGEX_HOLD] if patterns else []), default=0)

    @classmethod
    def from_file(cls, path: str | Path) -> OutputFilter:
        """One entry per line: a word or phrase (whole words, any case), or ``re:PATTERN``; ``#`` comments."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LmforgeError(f"cannot read the blocklist {path}: {exc}") from None
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        patterns = [e[len(REGEX_PREFIX):] for e in entries if e.startswith(REGEX_PREFIX)]
        words = [e for e in entries if not e.startswith(REGEX_PREFIX)]
        return cls(words, patterns)

    def __bool__(self) -> bool:
        return self.regex is not None

    def mask(self, text: str) -> str:
        if self.regex is None:
            return text
        return self.regex.sub(lambda m: "*" * len(m.group(0)), text)
