"""A generation request as the scheduler sees it: token ids in, token ids out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from runtime.core.ids import RequestId


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # A continued stream (recompute after preemption): the last N prompt tokens are output the
    # client already has. They prime the detokenizer, so the text goes on exactly where it stopped.
    resumed_tokens: int = 0
    # OpenAI's: subtracted from a token's logit, per time it was generated (frequency) and once if
    # it was (presence); generated tokens include a continued stream's resumed ones.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids distinct
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely
    grammar: str | None = None  # structured output: an llguidance grammar (runtime.engine.structured)
    prompt_logprobs: int | None = None  # like logprobs, for the prompt's tokens (echo)

    def __post_init__(self) -> None:
        if self.resumed_tokens < 0:
            raise ValueError(f"resumed_tokens must be >= 0, got {self.resumed_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or any(t < 0 for t in ids):
            raise ValueError("logit_bias token ids must be distinct and >= 0")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def adjusts_logits(self) -> bool:
        return self.penalized or bool(self.logit_bias)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client
    PREEMPTED = "preempted"  # evicted; the output carries what is needed to continue elsewhere


class RequestStatus(enum.Enum):
    """WAITING -> RUNNING -> FINISHED; RUNNING -> WAITING when preempted (recompute)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Mutable request state. Owned by the Scheduler; nobody else writes it."""

    rid: RequestId
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_s: float
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it first started
    first_token_s: float | None = None  # when its first output token existed (the caller's clock)
    # Output tokens of a continued stream (the last ``deadline_resumed`` prompt tokens, produced on
    # an earlier instance) that count as emitted in its deadlines: 0 unless its deadlines keep
    # running from its original arrival (runtime.device.DeviceLoop.anchor); and when the stream's
    # first token came (the caller's clock; None if unknown), which its later tokens are timed from.
    deadline_resumed: int = 0
    deadline_first_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def resumed_ids(self) -> tuple[int, ...]:
        """The prompt's last ``params.resumed_tokens`` ids: a continued stream's output so far."""
        return self.prompt_token_ids[len(self.prompt_token_ids) - self.params.resumed_tokens:]

    def generated_ids(self) -> list[int]:
        """Every token generated for this stream: resumed ones, then this request's own output."""
        return [*self.resumed_ids, *self.output_token_ids]

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        return tuple(self.token_at(i) for i in range(start, end))
