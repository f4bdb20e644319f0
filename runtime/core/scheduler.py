"""Continuous batching for one model instance: plan a step, then apply its result.

One rule instead of prefill/decode modes: every scheduled request computes tokens until its
computed count catches up with its known tokens (prompt + output), at most `chunk` at a time.
When a request catches up, the step samples its next token. Requests join and leave between
steps. Running requests are served first (FCFS); if the KV pool cannot hold a running request's
next tokens, the most recently arrived running request is preempted and recomputed later.
With a ``prefill_key`` (the device loop passes each request's first-token deadline), prompt chunks
go to the requests with the smallest key first, started or not, so a short prompt due soon is not
stuck behind a long one that arrived a moment earlier: the order admission's replay assumes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from runtime.core.block_pool import BlockHash, KVCacheManager, block_names
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
        # The name of each request's first KV block, when its prompt could share it (prefix
        # caching): a request whose first block another is computing right now waits for it.
        self._first_block: dict[RequestId, BlockHash] = {}

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
        bs = self.kv.block_size
        if self.kv.prefix_caching and req.params.prompt_logprobs is None and req.num_tokens > bs:
            self._first_block[req.rid] = block_names(req.tokens(0, bs), bs)[0]

    def get(self, rid: RequestId) -> Request | None:
        return self._requests.get(rid)

    def finish(self, rid: RequestId, reason: FinishReason) -> bool:
        """End a request now (abort, stop string); frees its blocks. False if unknown."""
        req = self._requests.pop(rid, None)
        if req is None:
            return False
        self._first_block.pop(rid, None)
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
    def schedule(self, prefill_budget: int | None = None,
                 prefill_key: Callable[[Request], float] | None = None) -> StepPlan:
        """Plan one step. ``prefill_budget`` caps the prompt tokens (prefill chunks) in it, on top
        of the one token each decode takes: a long chunk in the same step as decodes delays their
        next token by the whole chunk, so the device loop sizes it to the tightest decode deadline.
        ``prefill_key`` orders the prompt chunks (smallest first, arrival order among equals);
        without it they go FCFS, running requests before waiting ones."""
        budget = self.config.max_num_batched_tokens
        prefill_left = budget if prefill_budget is None else max(0, prefill_budget)
        seqs: list[ScheduledSeq] = []
        preempted: list[RequestId] = []
        scheduled: set[RequestId] = set()
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 1:  # a prefill chunk (a decode computes exactly one token)
                n = 0 if prefill_key is not None else min(n, prefill_left)  # keyed: in the pass below
                if n <= 0:
                    continue  # no prefill room this step; decodes behind it still run
            if not self._allocate_running(req, n, scheduled, preempted):
                continue  # req preempted itself
            seqs.append(self._seq(req, n))
            scheduled.add(req.rid)
            budget -= n
            if n > 1:
                prefill_left -= n
        if prefill_key is None:
            queue: list[Request] = list(self.waiting)
        else:  # started prompts and waiting ones compete for the chunk by key
            started = [r for r in self.running if r.rid not in scheduled]
            queue = sorted([*started, *self.waiting], key=prefill_key)
        # First blocks this step computes: a waiting request that would share one waits a step for
        # it rather than computing the same prompt prefix alongside (a burst, the n choices of one
        # ask). Only blocks already under way in this step count, so nobody waits on a request
        # that is itself not being served.
        bs = self.kv.block_size
        computing = {self._first_block[r.rid] for r in self.running
                     if r.rid in scheduled and r.rid in self._first_block and r.num_computed_tokens < bs}
        for req in queue:
            if budget <= 0:
                break
            if req.status is RequestStatus.RUNNING:  # a started prompt (keyed order only)
                n = min(req.num_tokens - req.num_computed_tokens, budget, prefill_left)
                if n > 0 and self._allocate_running(req, n, scheduled, preempted):
                    if req.rid in self._first_block and req.num_computed_tokens < bs:
                        computing.add(self._first_block[req.rid])
                    seqs.append(self._seq(req, n))
                    scheduled.add(req.rid)
                    budget -= n
                    prefill_left -= n
                continue
            if req.rid in preempted:
                if prefill_key is None:
                    break  # just evicted for lack of blocks: do not thrash it back in this step
                continue
            if len(self.running) >= self.config.max_num_seqs:
                break
            first = self._first_block.get(req.rid)
            if first in computing:
                continue  # its prefix is being computed: shared from the next step
            cacheable = req.params.prompt_logprobs is None  # (scoring needs every prompt position computed)
            if cacheable:
                req.num_computed_tokens = self.kv.match_prefix(req.rid, req.tokens(0, req.num_tokens))
                if not req.num_preemptions:
                    req.num_cached_tokens = req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget, self._fits(req))
            if n > 1:
                n = min(n, prefill_left)
            if n <= 0:
                if cacheable:
                    self.kv.unmatch(req.rid, req.num_tokens)  # a prefix found is shared again when it starts
                req.num_computed_tokens = 0
                break  # later requests do not overtake this one (FCFS, or by key)
            end = req.num_computed_tokens + n
            self.waiting.remove(req)
            self.kv.allocate(req.rid, end)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if first is not None and req.num_computed_tokens < bs:
                computing.add(first)
            seqs.append(self._seq(req, n))
            scheduled.add(req.rid)
            budget -= n
            if n > 1:
                prefill_left -= n
        return StepPlan(seqs=tuple(seqs), preempted=tuple(preempted))

    def _allocate_running(self, req: Request, n: int, scheduled: set[RequestId], preempted: list[RequestId]) -> bool:
        """Blocks for n more tokens of running req, preempting the newest running requests not yet
        in this step (possibly req itself) until they fit. False when req was preempted."""
        end = req.num_computed_tokens + n
        while not self.kv.can_allocate(req.rid, end):
            victim = next(r for r in reversed(self.running) if r.rid not in scheduled)  # newest first
            self._preempt(victim)
            preempted.append(victim.rid)
            if victim is req:
                return False
        self.kv.allocate(req.rid, end)
        return True

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
            self.kv.commit(req.rid, req.tokens, req.num_computed_tokens)
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
