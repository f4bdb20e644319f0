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
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import numpy as llnp
from torch import Tensor

# JSON as json.dumps writes it: no free whitespace, where small models tend to loop on newlines
# until max_tokens. A schema's own "x-guidance" options override these (llguidance's order).
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """One engine's view of its tokenizer for llguidance (built on first use: 0.2 s for
    SmolLM2's 49k tokens) and the grammars it has compiled. Thread-safe: the server compiles,
    the device thread makes guides."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._ll

    def compile(self, schema: Mapping[str, Any]) -> str:
        """The grammar for a JSON schema; ValueError (with llguidance's reason) if it is not one we
        can enforce."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a usable JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer())
        if error and not error.startswith("WARNING"):
            raise ValueError(f"not a usable JSON schema: {error}")
        return str(grammar)

    def guide(self, grammar: str, resumed: Sequence[int] = ()) -> Guide:
        return Guide(llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0), self.vocab_size, resumed)


class Guide:
    """One request's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, resumed: Sequence[int]) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._mask = llnp.allocate_token_bitmask(1, vocab_size)
        if resumed and not self._m.consume_tokens(list(resumed)):
            raise ValueError(f"the resumed tokens do not follow the grammar: {self._m.get_error()}")
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise ValueError(f"structured output failed: {self._m.get_error()}")

    def allowed(self) -> Tensor:
        """Which tokens may come next (bool, one per vocabulary entry)."""
        llnp.fill_next_token_bitmask(self._m, self._mask)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._vocab]
        return torch.from_numpy(bits.astype(np.bool_))

    def accept(self, token_id: int) -> None:
        self._m.consume_token(token_id)
        self._check()

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more."""
        return bool(self._m.is_stopped())
