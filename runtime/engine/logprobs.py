"""Log probabilities of generated tokens, and their OpenAI shapes.

A logprob is the model's own: log-softmax of the raw logits, before temperature, penalties and
logit_bias (vLLM's default), so a classifier function that limits its answer with logit_bias
still reads how likely each label was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (id, logprob), most likely first


def token_logprob(logits: Tensor, token_id: int, k: int) -> TokenLogprob:
    """One row of logits [vocab]: ``token_id``'s logprob and the ``k`` most likely."""
    return token_logprobs(logits.unsqueeze(0), [token_id], k)[0]


def token_logprobs(logits: Tensor, token_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Rows of logits [n, vocab] and the token each row scores, in one pass (a prompt's are
    hundreds of rows)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    if k <= 0:
        return [TokenLogprob(t, v) for t, v in zip(token_ids, chosen, strict=True)]
    values, top_ids = lp.topk(min(k, lp.shape[1]), dim=-1)
    return [TokenLogprob(t, v, tuple(zip(i, w, strict=True)))
            for t, v, i, w in zip(token_ids, chosen, top_ids.tolist(), values.tolist(), strict=True)]


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) spells every byte as one printable character
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]


class TokenSpelling:
    """A tokenizer's token ids as OpenAI reports them: the token's bytes, and its text (the bytes
    as UTF-8, U+FFFD where a character is split across tokens). One per tokenizer; memoized."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._bytes: dict[int, bytes] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    def bytes_of(self, token_id: int) -> bytes:
        got = self._bytes.get(token_id)
        if got is None:
            got = self._bytes[token_id] = self._spell(token_id)
        return got

    def _spell(self, token_id: int) -> bytes:
        if self._byte_level and token_id not in self._special:
            piece = self._tok.convert_ids_to_tokens(token_id)
            table = _unicode_to_byte()
            if isinstance(piece, str) and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return str(self._tok.decode([token_id])).encode("utf-8")

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    # -- OpenAI's shapes --------------------------------------------------------------------
    def chat_entry(self, t: TokenLogprob) -> dict[str, Any]:
        """One token of a chat choice's ``logprobs.content``."""
        return {**self._one(t.token_id, t.logprob), "top_logprobs": [self._one(i, v) for i, v in t.top]}

    def _one(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text_of(token_id), "logprob": logprob, "bytes": list(self.bytes_of(token_id))}

    def completion(self, ts: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """A completion choice's ``logprobs`` for these tokens; ``offset``: characters of output
        text before the first of them (``text_offset`` counts token texts, as vLLM's does)."""
        tokens = [self.text_of(t.token_id) for t in ts]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in ts],
                # the chosen token too: "up to logprobs+1 elements", as OpenAI's legacy API has it
                "top_logprobs": [{**{self.text_of(i): v for i, v in t.top}, self.text_of(t.token_id): t.logprob}
                                 for t in ts],
                "text_offset": offsets}


class LogprobsFormat:
    """One response's ``logprobs`` values, chunk by chunk: chat's shape (``{"content": [...]}``)
    or the completions API's, whose ``text_offset`` runs on across chunks from ``offset``."""

    def __init__(self, spelling: TokenSpelling, chat: bool, offset: int = 0) -> None:
        self.spelling, self.chat, self.offset = spelling, chat, offset

    def fresh(self) -> LogprobsFormat:
        """The same format from the start again (another choice of the answer)."""
        return LogprobsFormat(self.spelling, self.chat, self.offset)

    def __call__(self, ts: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self.spelling.chat_entry(t) for t in ts], "refusal": None}
        out = self.spelling.completion(ts, self.offset)
        self.offset += sum(len(s) for s in out["tokens"])
        return out

    def prompt(self, first_token_id: int, ts: list[TokenLogprob]) -> dict[str, Any]:
        """An echoed prompt's logprobs (completions API): its first token has none."""
        first = self.spelling.text_of(first_token_id)
        head: dict[str, Any] = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None],
                                "text_offset": [self.offset]}
        self.offset += len(first)
        rest = self(ts)
        return {k: head[k] + rest[k] for k in head}

    def echoed(self, first_token_id: int, prompt: list[TokenLogprob], output: list[TokenLogprob]) -> dict[str, Any]:
        """An echoed prompt's logprobs and then the output's, as one completions-API value."""
        head, rest = self.prompt(first_token_id, prompt), self(output)
        return {k: head[k] + rest[k] for k in head}
