"""Structured output: a grammar (from a JSON schema) enforced token by token with llguidance, the
grammar engine vLLM and llama.cpp use.

The server turns a request's ``response_format`` into an llguidance grammar (``Grammars.compile``,
off the event loop: a large schema takes milliseconds); the grammar travels in
``SamplingParams.grammar`` as text, so a continuation carries it; the engine keeps one ``Guide``
per request, which masks every token the grammar does not allow before sampling and follows the
tokens sampled. A continued stream's guide first follows its resumed tokens.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import numpy as llnp
from torch import Tensor

log = logging.getLogger(__name__)

# JSON as json.dumps writes it: no free whitespace, where small models tend to loop on newlines
# until max_tokens. A schema's own "x-guidance" options override these (llguidance's order).
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """A tokenizer's view for llguidance (built on first use: 0.2 s for SmolLM2's 49k tokens) and
    the grammars compiled against it, each as a matcher to copy. Compiling takes milliseconds
    (10 ms for a 40-field schema) and is done by the server off its event loop; the device thread
    only copies (~20 us), so a large schema never stalls other requests' tokens. One per tokenizer
    object (``of``): the instances of one checkpoint share its loaded tokenizer, so they share
    this too. Thread-safe."""

    CACHED = 64  # compiled grammars kept (least recently used dropped)
    _shared: weakref.WeakKeyDictionary[Any, Grammars] = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> Grammars:
        """The one for this tokenizer object (made on first call; gone with the tokenizer)."""
        with cls._shared_lock:
            got = cls._shared.get(tokenizer)
            if got is None or got.vocab_size != vocab_size:
                got = cls._shared[tokenizer] = cls(tokenizer, vocab_size)
            return got

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._ll

    def compile(self, schema: Mapping[str, Any]) -> str:
        """The grammar for a JSON schema, compiled and kept; ValueError (with llguidance's
        reason) if it is not one we can enforce."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a usable JSON schema: {e}") from None
        self._matcher(grammar)
        return str(grammar)

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        with self._lock:
            got = self._compiled.get(grammar)
            if got is not None:
                self._compiled.move_to_end(grammar)
                return got
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"not a usable JSON schema: {matcher.get_error()}")
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return matcher

    def guide(self, grammar: str, resumed: Sequence[int] = (), eos_ids: Sequence[int] = ()) -> Guide:
        return Guide(self._matcher(grammar).deep_copy(), self.vocab_size, resumed, eos_ids)


class Guide:
    """One request's grammar state. Once generating, it never raises: a grammar that fails midway
    (llguidance's resource limits, a dead end) ends that request, as a stop, and nothing else on
    the device; an exception in an engine step would evict every request of the instance."""

    def __init__(self, matcher: Any, vocab_size: int, resumed: Sequence[int], eos_ids: Sequence[int] = ()) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._mask = llnp.allocate_token_bitmask(1, vocab_size)
        self._eos = [i for i in eos_ids if 0 <= i < vocab_size]
        self.failed: str | None = None
        if resumed and not self._m.consume_tokens(list(resumed)):
            raise ValueError(f"the resumed tokens do not follow the grammar: {self._m.get_error()}")
        if self._m.is_error():
            raise ValueError(f"structured output failed: {self._m.get_error()}")

    def allowed(self) -> Tensor:
        """Which tokens may come next (bool, one per vocabulary entry); only end-of-sequence once
        the grammar has failed."""
        if self.failed is None:
            llnp.fill_next_token_bitmask(self._m, self._mask)
            bits = torch.from_numpy(np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._vocab].astype(np.bool_))
            if bool(bits.any()):
                return bits
            self._fail("the grammar allows no next token")
        only_eos = torch.zeros(self._vocab, dtype=torch.bool)
        only_eos[self._eos or [0]] = True
        return only_eos

    def accept(self, token_id: int) -> None:
        if self.failed is None and not self._m.consume_token(token_id):
            self._fail(self._m.get_error() or f"token {token_id} was not allowed")

    def _fail(self, why: str) -> None:
        self.failed = why
        log.warning("structured output ended early: %s", why)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more, or it failed."""
        return self.failed is not None or bool(self._m.is_stopped())
