"""Incremental detokenization with stop strings.

Text is emitted only once it is final: an incomplete UTF-8 sequence (decoded as U+FFFD) and any
tail that could still become a stop string are held back.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def add(self, token_ids: tuple[int, ...] | list[int], final: bool = False) -> str:
        """Append tokens; return the newly final text. Sets .stopped when a stop string hits."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        full = self._tok.decode(self._ids, skip_special_tokens=True)
        if self._stop:
            start = max(0, len(self.text) - self._hold)
            hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(full[: min(hits)])
        if not final:
            if full.endswith("\ufffd"):
                full = full[:-1]
            if self._hold:
                full = full[: max(len(self.text), len(full) - self._hold)]
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text):]
        self.text = upto if len(upto) > len(self.text) else self.text
        return delta
