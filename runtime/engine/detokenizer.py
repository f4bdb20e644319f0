"""Incremental detokenization with stop strings.

Text is emitted only once it is final: an incomplete UTF-8 sequence (decoded as U+FFFD: one for
byte-level BPE, one per byte token for SentencePiece byte fallback) and any tail that could still
become a stop string are held back.

Each call decodes only the tokens since the last character boundary, plus the chunk before it
for context (a SentencePiece decoder drops the leading space of a window's first token, so the
chunk's own text is decoded with it and subtracted, as vLLM does). Decoding every output id
again per token cost 0.65 ms per token at 4k tokens, on the device thread, per request in the
batch. For valid UTF-8 the emitted text is exactly that of decoding all ids at once
(tests/test_detokenizer.py holds it to that reference). Decoding everything was also wrong for
byte fallback: a character still incomplete turns the whole run of byte tokens before it into
U+FFFD, so "🙂🙂" streamed as replacement characters; a window that starts at the last boundary
does not reach back.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        # ids[:_base] decode to _stable_len characters and end on a character boundary;
        # ids[_ctx:_base] is the chunk before, decoded as _ctx_text, the context for what follows.
        self._ctx = 0
        self._base = 0
        self._ctx_text = ""
        self._stable_len = 0
        self._recent = ""  # the stable text from where stop strings are still searched (see add)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def add(self, token_ids: tuple[int, ...] | list[int], final: bool = False) -> str:
        """Append tokens; return the newly final text. Sets .stopped when a stop string hits."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        tail = self._decode_tail()
        # region = all text from r0 on; everything this call looks at lies there (stop strings
        # are searched from len(text) - hold, which _recent keeps r0 at or before)
        region = self._recent + tail
        r0 = self._stable_len - len(self._recent)
        emitted = len(self.text)
        if self._stop:
            start = max(0, emitted - self._hold) - r0
            hits = [i for i in (region.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(region, r0, r0 + min(hits))
        end = r0 + len(region)
        if not final:
            end -= len(region) - len(region.rstrip("\ufffd"))
            if self._hold:
                end = max(emitted, end - self._hold)
        delta = self._emit(region, r0, end)
        if tail and not tail.endswith("\ufffd"):  # a character boundary: what is decoded is stable
            self._ctx, self._base = self._base, len(self._ids)
            self._ctx_text = self._decode(self._ctx, self._base)
            self._stable_len += len(tail)
        keep_from = max(0, len(self.text) - self._hold) - r0
        self._recent = region[keep_from: self._stable_len - r0]
        return delta

    def _decode(self, start: int, stop: int | None = None) -> str:
        text: str = self._tok.decode(self._ids[start:stop], skip_special_tokens=True)
        return text

    def _decode_tail(self) -> str:
        """The text of ids[_base:], decoded after its context chunk."""
        if self._base == len(self._ids):
            return ""
        window = self._decode(self._ctx)
        return window[len(self._ctx_text):]

    def _emit(self, region: str, r0: int, upto: int) -> str:
        emitted = len(self.text)
        if upto <= emitted:
            return ""
        delta = region[emitted - r0: upto - r0]
        self.text += delta
        return delta
