"""LLMEngine: one model instance with its KV pool, stepped by its owner thread.

step(): plan (scheduler) -> execute (model runner) -> apply (scheduler.update + detokenize).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from runtime.core.block_pool import NO_HIT, BlockPool, KVCacheManager, PrefixHit
from runtime.core.ids import RequestId
from runtime.core.memory import context_bound, reservation_blocks
from runtime.core.request import FinishReason, Request, SamplingParams
from runtime.core.scheduler import Scheduler, SchedulerConfig, StepPlan
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.logprobs import TokenLogprob, TokenSpelling, token_logprob, token_logprobs
from runtime.engine.runner import ModelRunner
from runtime.engine.sampler import Bias, bias_tensors, sample
from runtime.engine.structured import Grammars, Guide
from runtime.models.llama import PagedKVCache
from runtime.models.loader import LoadedModel


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 32
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: min(model's max positions, 4096)
    prefix_caching: bool = True  # share the KV of prompt prefixes already computed (block_pool)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_cache_bytes < 0:
            raise ValueError(f"invalid engine config: {self}")


@dataclass(frozen=True)
class Continuation:
    """Enough to resume an evicted request elsewhere by recompute: prefill prompt + output so
    far, then generate the remaining tokens. Greedy output equals an uninterrupted run."""

    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    params: SamplingParams
    first_token_s: float | None = None  # when the stream's first token came (the engine's clock)

    def resume(self) -> tuple[list[int], SamplingParams]:
        left = max(1, self.params.max_tokens - len(self.output_token_ids))
        resumed = self.params.resumed_tokens + len(self.output_token_ids)
        return [*self.prompt_token_ids, *self.output_token_ids], replace(self.params, max_tokens=left,
                                                                          resumed_tokens=resumed)


@dataclass(frozen=True)
class RequestOutput:
    rid: RequestId
    new_token_ids: tuple[int, ...]
    text: str  # new text since the previous output
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    continuation: Continuation | None = None  # set when finish_reason is PREEMPTED
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when the request asked
    # with the first token, when asked: each prompt token's but the first (nothing predicts it)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's usage detail)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def rss_bytes() -> int:
    """Resident set size of this process (Linux), what the pod's memory limit sees."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so an unload shows."""
    with contextlib.suppress(OSError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PromptTooLongError(ValueError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(
            f"this model's maximum context length is {limit} tokens; "
            f"the prompt has {prompt_tokens} tokens (it must leave room for at least 1 output token)"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, grammars: Grammars | None = None):
        self.config = config or EngineConfig()
        self.loaded = loaded
        mc = loaded.config
        self.max_model_len = self.config.max_model_len or min(mc.max_position, 4096)
        dtype = loaded.model.dtype  # the KV is kept in the model's dtype
        per_block = self.bytes_per_block = PagedKVCache.bytes_per_block(mc, self.config.block_size, dtype.itemsize)
        num_blocks = self.config.kv_cache_bytes // per_block  # 0 is fine: a device grows it later
        self.cache = PagedKVCache(mc, num_blocks, self.config.block_size, dtype)
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=self.config.max_num_seqs,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            KVCacheManager(self.pool, self.config.block_size, self.config.prefix_caching),
        )
        self.runner = ModelRunner(loaded.model, self.cache)
        self.tokenizer: Any = loaded.tokenizer
        self.spelling = TokenSpelling(self.tokenizer)  # token ids as logprobs report them
        self.eos_ids = frozenset(mc.eos_token_ids) | self._tokenizer_eos()
        self._detok: dict[RequestId, IncrementalDetokenizer] = {}
        self._guides: dict[RequestId, Guide] = {}  # requests with a grammar (response_format)
        self._biases: dict[RequestId, Bias] = {}  # requests with a logit_bias, as tensors
        # requests scoring their prompt (prompt_logprobs): (next position to score, logprobs so far)
        self._scoring: dict[RequestId, tuple[int, list[TokenLogprob]]] = {}
        self.grammars = grammars or Grammars.of(self.tokenizer, loaded.config.vocab_size)
        self._gens: dict[RequestId, torch.Generator | None] = {}
        self.last_plan: StepPlan | None = None

    def _tokenizer_eos(self) -> frozenset[int]:
        eid = getattr(self.tokenizer, "eos_token_id", None)
        return frozenset([eid]) if isinstance(eid, int) else frozenset()

    # -- intake -----------------------------------------------------------------------------
    def add_request(self, rid: RequestId, prompt_token_ids: list[int], params: SamplingParams, now: float,
                    deadline_resumed: int = 0, deadline_first_s: float | None = None) -> None:
        """Queue a request arriving at ``now`` (its deadlines' origin); ``deadline_resumed`` and
        ``deadline_first_s``: see ``Request``."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), self.max_model_len)
        if params.resumed_tokens >= len(prompt_token_ids):
            raise ValueError(f"resumed_tokens ({params.resumed_tokens}) must be < the prompt's "
                             f"{len(prompt_token_ids)} tokens")
        req = Request(
            rid=rid, prompt_token_ids=tuple(prompt_token_ids), params=params, arrival_s=now,
            eos_token_ids=self.eos_ids, deadline_resumed=min(deadline_resumed, params.resumed_tokens),
            deadline_first_s=deadline_first_s if deadline_resumed else None,
        )
        # before the request is queued: resumed tokens the grammar refuses are the caller's error
        guide = self.grammars.guide(params.grammar, req.resumed_ids, sorted(self.eos_ids)) if params.grammar else None
        self.scheduler.add(req)
        detok = self._detok[rid] = IncrementalDetokenizer(self.tokenizer, params.stop)
        if params.resumed_tokens:  # the client has this text already: prime, do not emit
            detok.add(req.resumed_ids)
        if guide is not None:
            self._guides[rid] = guide
        if (bias := bias_tensors(params)) is not None:
            self._biases[rid] = bias
        if params.prompt_logprobs is not None:
            self._scoring[rid] = (0, [])
        if params.greedy:
            self._gens[rid] = None
        else:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self._gens[rid] = torch.Generator().manual_seed(seed)

    def abort(self, rid: RequestId) -> bool:
        """Drop a request now; its KV blocks return to the pool at once."""
        self._forget(rid)
        return self.scheduler.finish(rid, FinishReason.ABORT)

    def evict(self, rid: RequestId) -> RequestOutput | None:
        """End a request with finish_reason PREEMPTED and a continuation; frees its KV now."""
        req = self.scheduler.get(rid)
        if req is None:
            return None
        detok = self._detok.get(rid)
        text = detok.add((), final=True) if detok is not None else ""  # flush held-back text
        self._forget(rid)
        self.scheduler.finish(rid, FinishReason.PREEMPTED)
        first = req.deadline_first_s if req.deadline_resumed else req.first_token_s  # the stream's, if known
        cont = Continuation(req.prompt_token_ids, tuple(req.output_token_ids), req.params, first)
        return RequestOutput(rid, (), text, FinishReason.PREEMPTED, len(req.prompt_token_ids),
                             len(req.output_token_ids), cont)

    def evict_all(self) -> list[RequestOutput]:
        rids = [r.rid for r in (*self.scheduler.running, *self.scheduler.waiting)]
        return [o for o in (self.evict(r) for r in rids) if o is not None]

    def _score_prompt(self, rid: RequestId, first: int, rows: torch.Tensor) -> None:
        """Logprobs of the prompt tokens these logits predict (row i: position first + i, which
        predicts the token after it), each position once even if the prompt is recomputed."""
        req = self.scheduler.get(rid)
        entry = self._scoring.get(rid)
        if req is None or entry is None or req.params.prompt_logprobs is None:
            return
        want, got = entry
        end = len(req.prompt_token_ids) - req.params.resumed_tokens - 1  # positions that predict prompt tokens
        lo, hi = max(0, want - first), min(rows.shape[0], end - first)
        if hi > lo:
            got.extend(token_logprobs(rows[lo:hi], req.prompt_token_ids[first + lo + 1:first + hi + 1],
                                      req.params.prompt_logprobs))
        self._scoring[rid] = (max(want, min(first + rows.shape[0], end)), got)

    def _forget(self, rid: RequestId) -> None:
        self._scoring.pop(rid, None)
        self._detok.pop(rid, None)
        self._gens.pop(rid, None)
        self._guides.pop(rid, None)
        self._biases.pop(rid, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the loop body ----------------------------------------------------------------------
    def step(self, clock: Callable[[], float] | None = None, prefill_budget: int | None = None,
             prefill_key: Callable[[Request], float] | None = None) -> list[RequestOutput]:
        """One iteration. ``clock``, read once the tokens exist, stamps first tokens (the device
        loop's deadlines count from them); ``prefill_budget`` caps its prompt tokens and
        ``prefill_key`` orders them (Scheduler.schedule)."""
        evicted = self.evict_oversized()
        plan = self.scheduler.schedule(prefill_budget, prefill_key)  # plan
        self.last_plan = plan
        if plan.empty:
            return evicted
        score = {rid: want for rid, (want, _) in self._scoring.items()} if self._scoring else None
        rids, logits, scored = self.runner.execute(plan, score)  # execute
        for rid, (first, chunk) in scored.items():
            self._score_prompt(rid, first, chunk)
        reqs = [self.scheduler.get(r) for r in rids]
        by_id = {r.rid: r for r in reqs if r is not None}  # still readable after they finish
        params = [r.params if r else SamplingParams(temperature=0) for r in reqs]
        generated = [r.generated_ids() if r is not None and r.params.penalized else () for r in reqs]
        guides = [self._guides.get(r) for r in rids] if self._guides else None
        allowed = [g.allowed() if g is not None else None for g in guides] if guides is not None else None
        biases = [self._biases.get(r) for r in rids] if self._biases else None
        tokens = sample(logits, params, [self._gens.get(r) for r in rids], generated, allowed, biases)
        for g, t in zip(guides or (), tokens, strict=False):
            if g is not None:
                g.accept(t)
        rows = {r: i for i, r in enumerate(rids)}
        now = clock() if clock is not None else None
        updates = self.scheduler.update(plan, dict(zip(rids, tokens, strict=True)), now)  # apply
        outputs: list[RequestOutput] = evicted
        for u in updates:
            req = by_id[u.rid]
            detok = self._detok[u.rid]
            reason = u.finish_reason
            text = detok.add(u.new_token_ids, final=reason is not None)
            guide = self._guides.get(u.rid)
            if reason is None and (detok.stopped or (guide is not None and guide.done)):
                reason = FinishReason.STOP  # a stop string, or the grammar is complete
                self.scheduler.finish(u.rid, reason)
                text += detok.add((), final=True)
            k = req.params.logprobs
            lps = () if k is None else tuple(token_logprob(logits[rows[u.rid]], t, k) for t in u.new_token_ids)
            scoring = self._scoring.pop(u.rid, None)  # the prompt is done: its first token is out
            outputs.append(RequestOutput(
                u.rid, u.new_token_ids, text, reason, len(req.prompt_token_ids), len(req.output_token_ids),
                logprobs=lps, prompt_logprobs=tuple(scoring[1]) if scoring is not None else (),
                cached_tokens=req.num_cached_tokens,
            ))
            if reason is not None:
                self._forget(u.rid)
        return outputs

    # -- KV capacity ------------------------------------------------------------------------
    def resize_kv(self, num_blocks: int) -> None:
        """Grow or shrink this instance's KV pool. Shrinking compacts live blocks first; it
        fails (ValueError) if more than num_blocks are in use."""
        if num_blocks == self.pool.num_blocks:
            return
        moves = self.scheduler.kv.compact(num_blocks) if num_blocks < self.pool.num_blocks else []
        if num_blocks > self.pool.num_blocks:
            self.pool.resize(num_blocks)
        self.cache.resize(num_blocks, [(int(a), int(b)) for a, b in moves])

    def prefix_hit(self, prompt_token_ids: list[int] | tuple[int, ...], params: SamplingParams) -> PrefixHit:
        """What this prompt finds in the prefix cache now (a request scoring its prompt computes
        every position, so it finds nothing)."""
        if params.prompt_logprobs is not None:
            return NO_HIT
        return self.scheduler.kv.prefix_hit(prompt_token_ids)

    def reserved_blocks(self, lookahead_tokens: int) -> int:
        """Forward-looking reservation: each live request's prompt + output + look-ahead, never
        past what its max_tokens lets it reach; a prefix block that several requests share is
        reserved once."""
        bs, limit = self.config.block_size, self.max_model_len
        each = sum(reservation_blocks(r.num_tokens, lookahead_tokens, bs,
                                      context_bound(len(r.prompt_token_ids), r.params.max_tokens, limit))
                   for r in (*self.scheduler.running, *self.scheduler.waiting))
        return each - self.pool.shared_extra

    def evict_oversized(self) -> list[RequestOutput]:
        """A request whose next token cannot fit even in the whole pool would be preempted and
        recomputed forever: end it with a continuation so it can run elsewhere. A device grows
        the pool first when its budget allows, so this happens only when it cannot."""
        cap = self.pool.num_blocks * self.config.block_size
        big = [r.rid for r in (*self.scheduler.running, *self.scheduler.waiting) if r.num_tokens + 1 > cap]
        return [o for o in (self.evict(rid) for rid in big) if o is not None]

    # -- introspection ----------------------------------------------------------------------
    @property
    def kv_blocks_total(self) -> int:
        return self.pool.num_blocks

    @property
    def kv_blocks_used(self) -> int:
        return self.pool.num_used

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]], system_prompt: str | None = None) -> str:
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
