"""Several model instances sharing one device, token by token.

One thread owns a DeviceLoop. Before every grant the EDF arbiter (runtime.core.arbiter) picks the
instance whose most urgent request is closest to its next-token deadline; that instance's engine
runs the granted iterations. Instances without work are not candidates and cost nothing.
Admission (runtime.core.admission) decides whether a request may join an instance at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from functions import FunctionSpec
from runtime.core.admission import Decision, InstanceLoad, NewRequest, PendingPrefill, admit
from runtime.core.arbiter import Candidate, DeviceKind, Grant, Phase, next_token_deadline, pick
from runtime.core.block_pool import blocks_for
from runtime.core.estimator import LatencyEstimator
from runtime.core.request import Request
from runtime.engine.engine import LLMEngine, RequestOutput


@dataclass
class Instance:
    iid: str
    spec: FunctionSpec
    engine: LLMEngine
    estimator: LatencyEstimator
    load_delay_s: float = 0.0  # counted in every request's deadline while it is hosted here
    decode_quota: int = 1

    def requests(self) -> list[Request]:
        s = self.engine.scheduler
        return [*s.running, *s.waiting]

    def deadline(self, req: Request) -> float:
        slo = self.spec.slo
        return next_token_deadline(req.arrival_s, slo.ttft_s(len(req.prompt_token_ids)), slo.tpot_s,
                                   len(req.output_token_ids), self.load_delay_s)

    def load(self) -> InstanceLoad:
        decoding = [r for r in self.engine.scheduler.running if r.num_computed_tokens >= len(r.prompt_token_ids)]
        prefills = tuple(
            PendingPrefill(r.num_tokens - r.num_computed_tokens, self.deadline(r))
            for r in self.requests() if r.num_computed_tokens < len(r.prompt_token_ids)
        )
        avg = sum(r.num_tokens for r in decoding) / len(decoding) if decoding else 0.0
        return InstanceLoad(self.iid, self.estimator, self.spec.slo.tpot_s, len(decoding), avg, prefills,
                            self.engine.max_model_len)


@dataclass
class ArbiterStats:
    decisions: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    grants: dict[str, int] = field(default_factory=dict)

    @property
    def mean_us(self) -> float:
        return self.total_s / self.decisions * 1e6 if self.decisions else 0.0


class DeviceLoop:
    def __init__(self, kind: DeviceKind = DeviceKind.CPU):
        self.kind = kind
        self.instances: dict[str, Instance] = {}
        self.stats = ArbiterStats()

    def add_instance(self, inst: Instance) -> None:
        if inst.iid in self.instances:
            raise ValueError(f"instance {inst.iid!r} already on this device")
        self.instances[inst.iid] = inst

    def remove_instance(self, iid: str) -> Instance:
        return self.instances.pop(iid)

    @property
    def has_work(self) -> bool:
        return any(i.engine.has_work for i in self.instances.values())

    def admit(self, iid: str, prompt_tokens: int, now: float) -> Decision:
        inst = self.instances[iid]
        req = NewRequest(prompt_tokens, now + inst.load_delay_s + inst.spec.slo.ttft_s(prompt_tokens),
                         blocks_for(prompt_tokens + 1, inst.engine.config.block_size))
        loads = [i.load() for i in self.instances.values()]
        return admit(loads, iid, req, inst.engine.pool.num_free, now)

    def candidates(self) -> list[Candidate]:
        out = []
        for inst in self.instances.values():
            reqs = inst.requests()
            if not reqs:
                continue
            prefilling = any(r.num_computed_tokens < len(r.prompt_token_ids) for r in reqs)
            out.append(Candidate(inst.iid, min(inst.deadline(r) for r in reqs),
                                 Phase.PREFILL if prefilling else Phase.DECODE, inst.decode_quota))
        return out

    def step(self) -> tuple[Grant | None, list[RequestOutput]]:
        """One grant: pick by EDF, run the granted iterations of that instance."""
        t0 = time.perf_counter()
        grant = pick(self.candidates(), self.kind)
        dt = time.perf_counter() - t0
        self.stats.decisions += 1
        self.stats.total_s += dt
        self.stats.last_s = dt
        if grant is None:
            return None, []
        self.stats.grants[grant.instance_id] = self.stats.grants.get(grant.instance_id, 0) + 1
        inst = self.instances[grant.instance_id]
        outs: list[RequestOutput] = []
        for _ in range(grant.iterations):
            if not inst.engine.has_work:
                break
            t = time.perf_counter()
            outs.extend(inst.engine.step())
            self._observe(inst, time.perf_counter() - t)
        return grant, outs

    def _observe(self, inst: Instance, seconds: float) -> None:
        plan = inst.engine.last_plan
        if plan is None or plan.empty:
            return
        seqs = plan.seqs
        if all(len(s.token_ids) == 1 for s in seqs):
            ctx = sum(s.start_pos + 1 for s in seqs) / len(seqs)
            inst.estimator.observe_decode(ctx, len(seqs), seconds)
        elif len(seqs) == 1:
            inst.estimator.observe_prefill(len(seqs[0].token_ids), seconds)
