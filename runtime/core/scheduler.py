"""Continuous batching for one model instance: plan a step, then apply its result.

One rule instead of prefill/decode modes: every scheduled request computes tokens until its
computed count catches up with its known tokens (prompt + output), at most `chunk` at a time.
When a request catches up, the step samples its next token. Requests join and leave between
steps. Running requests are served first (FCFS); if the KV pool cannot hold a running request's
next tokens, the most recently arrived running request is preempted and recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.core.block_pool import KVCacheManager
from runtime.core.ids import BlockId, RequestId
from runtime.core.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # requests in one batch
    max_num_batched_tokens: int = 512  # tokens per step; longer prompts prefill in chunks
    max_model_len: int = 2048  # prompt + output

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler config: {self}")


@dataclass(frozen=True)
class ScheduledSeq:
    rid: RequestId
    token_ids: tuple[int, ...]  # the new tokens computed this step
    start_pos: int  # position of token_ids[0]
    block_ids: tuple[BlockId, ...]  # the request's whole block table
    sample: bool  # this chunk reaches the end of known tokens: sample the next one


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[RequestId, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class SeqUpdate:
    rid: RequestId
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[RequestId, Request] = {}

    # -- intake ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.rid in self._requests:
            raise ValueError(f"duplicate request id {req.rid!r}")
        if req.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {req.num_tokens} tokens; the limit is {self.config.max_model_len - 1}"
            )
        self._requests[req.rid] = req
        self.waiting.append(req)

    def get(self, rid: RequestId) -> Request | None:
        return self._requests.get(rid)

    def finish(self, rid: RequestId, reason: FinishReason) -> bool:
        """End a request now (abort, stop string); frees its blocks. False if unknown."""
        req = self._requests.pop(rid, None)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(rid)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- plan -------------------------------------------------------------------------------
    def schedule(self, prefill_budget: int | None = None) -> StepPlan:
        """Plan one step. ``prefill_budget`` caps the prompt tokens (prefill chunks) in it, on top
        of the one token each decode takes: a long chunk in the same step as decodes delays their
        next token by the whole chunk, so the device loop sizes it to the tightest decode deadline."""
        budget = self.config.max_num_batched_tokens
        prefill_left = budget if prefill_budget is None else max(0, prefill_budget)
        seqs: list[ScheduledSeq] = []
        preempted: list[RequestId] = []
        scheduled: set[RequestId] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 1:  # a prefill chunk (a decode computes exactly one token)
                n = min(n, prefill_left)
                if n <= 0:
                    i += 1  # no prefill room this step; decodes behind it still run
                    continue
            end = req.num_computed_tokens + n
            while not self.kv.can_allocate(req.rid, end):
                victim = self.running[-1]  # newest first; may be req itself
                self._preempt(victim)
                preempted.append(victim.rid)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue  # req preempted itself; running[i] is now the next one
            self.kv.allocate(req.rid, end)
            seqs.append(self._seq(req, n))
            scheduled.add(req.rid)
            budget -= n
            if n > 1:
                prefill_left -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.rid in preempted:
                break  # just evicted for lack of blocks: do not thrash it back in this step
            n = min(req.num_tokens - req.num_computed_tokens, budget, self._fits(req))
            if n > 1:
                n = min(n, prefill_left)
            if n <= 0:
                break  # FCFS: do not let later requests overtake
            end = req.num_computed_tokens + n
            self.waiting.popleft()
            self.kv.allocate(req.rid, end)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            budget -= n
            if n > 1:
                prefill_left -= n
        return StepPlan(seqs=tuple(seqs), preempted=tuple(preempted))

    def _fits(self, req: Request) -> int:
        """How many more tokens of req the free blocks can hold (a smaller prefill chunk)."""
        held = len(self.kv.block_table(req.rid)) * self.kv.block_size
        return held + self.kv.pool.num_free * self.kv.block_size - req.num_computed_tokens

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        return ScheduledSeq(
            rid=req.rid,
            token_ids=req.tokens(start, start + n),
            start_pos=start,
            block_ids=tuple(self.kv.block_table(req.rid)),
            sample=start + n == req.num_tokens,
        )

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.rid)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    # -- apply ------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: dict[RequestId, int], now: float | None = None) -> list[SeqUpdate]:
        """Apply a step's result: advance computed counts, append sampled tokens, finish. ``now``
        (the time the tokens exist) stamps each request's first token."""
        out: list[SeqUpdate] = []
        for seq in plan.seqs:
            req = self._requests.get(seq.rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished (aborted) while the step ran
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            if not seq.sample:
                continue
            tok = sampled[seq.rid]
            if not req.output_token_ids and req.first_token_s is None:
                req.first_token_s = now
            req.output_token_ids.append(tok)
            reason = self._check_stop(req, tok)
            if reason is not None:
                self.finish(req.rid, reason)
            out.append(SeqUpdate(req.rid, (tok,), reason))
        return out

    def _check_stop(self, req: Request, tok: int) -> FinishReason | None:
        if not req.params.ignore_eos and tok in req.eos_token_ids:
            return FinishReason.STOP
        if len(req.output_token_ids) >= req.params.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
