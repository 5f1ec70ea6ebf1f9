"""From one choice's generated tokens to the text a client may see.

`generate`'s text tracker turns tokens into printable pieces (holding back incomplete UTF-8
characters and what may become a stop string); the output filter then masks blocked text in
everything so far. A token is released once its text lies `hold` characters before the end, so
streamed chunks, logprobs and the final text all show the same masked characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.generate import _TextTracker
from lmforge.serve.limits import OutputFilter


@dataclass
class Released:
    """One generated token as the client sees it."""

    token: int
    text: str
    offset: int  # where `text` starts in the choice's generated text
    logprob: float | None
    top: list[tuple[int, float]] | None


class ChoiceText:
    def __init__(self, tokenizer, stops, output_filter: OutputFilter | None, eos_id: int | None):
        self.tracker = _TextTracker(tokenizer, stops)
        self.filter = output_filter if output_filter else None
        self.eos_id = eos_id
        self.tokens: list[Released] = []
        self.raw = ""  # the unmasked text so far
        self.released = 0  # tokens handed out
        self.finished = False

    @property
    def count(self) -> int:
        """Generated tokens so far, the end-of-text token and the one that met a stop string included."""
        return len(self.tokens)

    @property
    def stopped(self) -> bool:
        return self.tracker.stopped

    def push(self, token: int, logprob: float | None, top) -> list[Released]:
        piece = "" if token == self.eos_id or self.tracker.stopped else self.tracker.push(token)
        self.tokens.append(Released(token, piece, len(self.raw), logprob, top))
        self.raw += piece
        return self._release(final=False)

    def finish(self) -> list[Released]:
        """Everything still held back (the tracker's tail joins the last token)."""
        if self.finished:
            return []
        self.finished = True
        tail = self.tracker.finish()
        if tail and self.tokens:
            self.tokens[-1].text += tail
            self.raw += tail
        return self._release(final=True)

    def text(self) -> str:
        return self.filter.mask(self.raw) if self.filter else self.raw

    def _release(self, final: bool) -> list[Released]:
        masked = self.text()
        limit = len(self.raw) if final or not self.filter else len(self.raw) - self.filter.hold
        out = []
        while self.released < len(self.tokens):
            item = self.tokens[self.released]
            end = item.offset + len(item.text)
            if end > limit and not final:
                break
            item.text = masked[item.offset : end]
            out.append(item)
            self.released += 1
        return out
