"""The three ways of sharing one device that bench_capacity.py compares, behind one small protocol.

Every system takes the same `Job`s (one per trace arrival) through `submit(job, now)` and is driven
by the replay loop through `step(now)`: one engine iteration (or None when it has nothing to run
now). Times are seconds since the replay started; a job's `arrival_s` is its trace time, so the
wait before the loop picks it up counts against its TTFT.

  Exclusive  one instance on the device at a time (the paper's `sllm`). Jobs queue FCFS across
             functions; the head job's function is loaded once the current instance has no work
             (a real cold load: the weights copied from the host cache plus a fresh engine and KV). It
             starts with the first (busiest) function loaded.
             Jobs of the loaded function join its batch only while no other function's job is
             ahead of them in the queue (strict FCFS, no starvation).
  Static     every instance resident, KV split into K equal fixed partitions, round-robin one
             iteration per instance with work, no admission (jobs queue inside each engine).
  Ours       every instance on one DeviceLoop: shared KV budget, memory planner, EDF arbiter and
             admission. A refused job is retried as our activator retries it: when a request of
             its function finishes, and every 0.25 s (the paper artifact's period), until its TTFT
             deadline has passed; then it is dropped (a miss).
  OursNoAdmission  the same DeviceLoop with every job accepted (an ablation, not a system).

Common to all three: a job with no first token by its TTFT deadline is dropped (it is a miss
whatever happens next, and serving it would only steal time from jobs that can still make it).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from functions import FunctionSpec
from runtime.core.arbiter import DeviceKind
from runtime.core.estimator import LatencyEstimator, LatencyProfile
from runtime.core.ids import RequestId
from runtime.core.memory import MemoryConfig
from runtime.core.request import SamplingParams
from runtime.device import ArbiterStats, DeviceLoop, Instance
from runtime.engine.engine import EngineConfig, LLMEngine, RequestOutput, release_memory
from runtime.models.loader import LoadedModel

RETRY_EVERY_S = 0.25


class ReplayClock:
    """Seconds since the replay started: the timebase of every Job's times, and of the first-token
    stamps the device loop's deadlines count from."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


@dataclass
class Job:
    """One arrival of the replay and what became of it (seconds since the replay started)."""

    rid: RequestId
    function: str
    arrival_s: float
    prompt_ids: list[int]
    output_tokens: int
    ttft_slo_s: float
    first_s: float | None = None
    last_s: float | None = None
    tokens: int = 0
    dropped: str | None = None  # late | refused | evicted | unfinished
    note: str = ""  # the last admission refusal's detail, for --show-misses
    first_note: str = ""  # the first one (with when it came, s after arrival)

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.output_tokens, temperature=0, ignore_eos=True)

    def hopeless(self, now: float) -> bool:
        """No first token yet and its TTFT deadline has passed."""
        return self.first_s is None and now > self.arrival_s + self.ttft_slo_s


@dataclass(frozen=True)
class Fleet:
    """What every system is built from: one spec and one host-cached model per function."""

    specs: Mapping[str, FunctionSpec]
    models: Mapping[str, LoadedModel]
    profile: LatencyProfile
    engine: EngineConfig  # kv_cache_bytes is replaced per system
    kv_budget_bytes: int
    memory: MemoryConfig
    max_prefill_step_s: float = math.inf  # ours' DeviceLoop step cap (the chunk size is in `engine`)
    clock: ReplayClock = dataclasses.field(default_factory=ReplayClock)

    def engine_config(self, kv_bytes: int) -> EngineConfig:
        return dataclasses.replace(self.engine, kv_cache_bytes=kv_bytes)


class System(Protocol):
    name: str

    def submit(self, job: Job, now: float) -> None: ...

    def step(self, now: float) -> list[RequestOutput] | None:
        """Run one iteration; None when there is nothing to run now."""

    @property
    def busy(self) -> bool:
        """Anything queued, retrying or running."""

    def next_wakeup_s(self) -> float:
        """When something timed (a retry) is next due; inf if nothing is."""

    def stats(self) -> dict[str, float]: ...

    def warm(self) -> None:
        """Untimed, before the replay: touch what a long-running server would have touched."""

    def close(self) -> None: ...


WARM_RID = RequestId("__warm")
WARM_PARAMS = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
WARM_PROMPT = list(range(100, 116))


def drop_hopeless(engines: Iterable[LLMEngine], jobs: Mapping[RequestId, Job], now: float) -> None:
    for eng in engines:
        for req in (*eng.scheduler.running, *eng.scheduler.waiting):
            job = jobs[req.rid]
            if job.hopeless(now):
                eng.abort(req.rid)
                job.dropped = "late"


class Exclusive:
    name = "exclusive"

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.queue: deque[Job] = deque()
        self.jobs: dict[RequestId, Job] = {}
        self.current: str | None = None
        self.engine: LLMEngine | None = None
        self.load_s: list[float] = []

    def submit(self, job: Job, now: float) -> None:
        self.jobs[job.rid] = job
        self.queue.append(job)

    def step(self, now: float) -> list[RequestOutput] | None:
        late = [j for j in self.queue if j.hopeless(now)]
        for j in late:
            j.dropped = "late"
        self.queue = deque(j for j in self.queue if j.dropped is None)
        if self.engine is not None:
            drop_hopeless([self.engine], self.jobs, now)
        if (self.engine is None or not self.engine.has_work) and self.queue \
                and self.queue[0].function != self.current:
            self._switch(self.queue[0].function)
        while self.engine is not None and self.queue and self.queue[0].function == self.current:
            job = self.queue.popleft()
            self.engine.add_request(job.rid, job.prompt_ids, job.params, job.arrival_s)
        if self.engine is None or not self.engine.has_work:
            return None
        return self.engine.step()

    def _switch(self, function: str) -> None:
        """Unload the current instance, then load `function` from the host cache: copy its
        weights into fresh memory and build an engine with the device's whole KV budget."""
        t = time.perf_counter()
        self.engine = None
        gc.collect()
        release_memory()
        host = self.fleet.models[function]
        loaded = dataclasses.replace(host, model=copy.deepcopy(host.model))
        self.engine = LLMEngine(loaded, self.fleet.engine_config(self.fleet.kv_budget_bytes))
        self.current = function
        self.load_s.append(time.perf_counter() - t)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or (self.engine is not None and self.engine.has_work)

    def next_wakeup_s(self) -> float:
        return math.inf

    def warm(self) -> None:
        """Start in a steady state: the first (busiest) function loaded, as a device that has been
        serving a while would hold some instance; with K = 1 there is never a cold load. (This
        also keeps the process's first large allocation, several times slower than later ones,
        out of the measurement.)"""
        self._switch(next(iter(self.fleet.models)))
        self.load_s.clear()

    def stats(self) -> dict[str, float]:
        n = len(self.load_s)
        return {"cold_loads": n, "cold_load_mean_s": round(sum(self.load_s) / n, 3) if n else 0.0}

    def close(self) -> None:
        self.engine = None


class Static:
    name = "static"

    def __init__(self, fleet: Fleet, functions: Sequence[str]):
        cfg = fleet.engine_config(fleet.kv_budget_bytes // len(functions))
        self.engines = {fn: LLMEngine(fleet.models[fn], cfg) for fn in functions}
        self.order = list(functions)
        self.next = 0
        self.jobs: dict[RequestId, Job] = {}

    def submit(self, job: Job, now: float) -> None:
        self.jobs[job.rid] = job
        self.engines[job.function].add_request(job.rid, job.prompt_ids, job.params, job.arrival_s)

    def step(self, now: float) -> list[RequestOutput] | None:
        drop_hopeless(self.engines.values(), self.jobs, now)
        k = len(self.order)
        for i in range(k):
            eng = self.engines[self.order[(self.next + i) % k]]
            if eng.has_work:
                self.next = (self.next + i + 1) % k
                return eng.step()
        return None

    @property
    def busy(self) -> bool:
        return any(e.has_work for e in self.engines.values())

    def next_wakeup_s(self) -> float:
        return math.inf

    def warm(self) -> None:
        for eng in self.engines.values():
            eng.add_request(WARM_RID, WARM_PROMPT, WARM_PARAMS, 0.0)
            while eng.has_work:
                eng.step()

    def stats(self) -> dict[str, float]:
        eng = next(iter(self.engines.values()))
        return {"kv_blocks_per_instance": eng.kv_blocks_total}

    def close(self) -> None:
        self.engines.clear()


class Ours:
    name = "ours"

    def __init__(self, fleet: Fleet, functions: Sequence[str], retry_every_s: float = RETRY_EVERY_S,
                 wake_on_finish: bool = True, displace: bool = True, newcomer_slack: bool = True):
        if not retry_every_s > 0:
            raise ValueError(f"retry_every_s must be > 0, got {retry_every_s}")
        self.retry_every_s = retry_every_s
        self.wake_on_finish = wake_on_finish
        self.dev = DeviceLoop(DeviceKind.CPU, fleet.kv_budget_bytes, fleet.memory, clock=fleet.clock,
                              max_prefill_step_s=fleet.max_prefill_step_s, displace=displace,
                              newcomer_slack=newcomer_slack)
        self.profile = fleet.profile
        for fn in functions:  # engines start with no KV; the memory planner grows them
            eng = LLMEngine(fleet.models[fn], fleet.engine_config(0))
            self.dev.add_instance(Instance(fn, fleet.specs[fn], eng, LatencyEstimator(fleet.profile)))
        self.jobs: dict[RequestId, Job] = {}
        self.retries: list[tuple[float, Job]] = []
        self.refusals: Counter[str] = Counter()
        self.admitted = 0

    def submit(self, job: Job, now: float) -> None:
        self.jobs[job.rid] = job
        self._try(job, now)

    def _try(self, job: Job, now: float) -> None:
        d = self.dev.admit(job.function, len(job.prompt_ids), now, arrival_s=job.arrival_s,
                           max_tokens=job.params.max_tokens)
        if d.admitted:
            self.dev.instances[job.function].engine.add_request(job.rid, job.prompt_ids, job.params, job.arrival_s)
            self.dev.plan_memory()  # reserve its KV now, so the next admission sees it taken
            self.admitted += 1
            for out in self.dev.take_handed_back():
                # A longer prompt gave way to this one: as the activator continues a preempted
                # request, it is tried again at once (and then on the retry timer).
                self.jobs[out.rid].note = f"handed back for {job.rid}"
                self._try(self.jobs[out.rid], now)
            return
        self.refusals[d.reason.value if d.reason else "?"] += 1
        job.note = f"{d.reason.value if d.reason else '?'}: {d.detail}"
        if not job.first_note:
            job.first_note = f"at +{now - job.arrival_s:.3f}s {job.note}"
        # It waits for its next try while its TTFT deadline has not passed: a timer retry past the
        # deadline never comes, but a finish of its function may wake it sooner.
        self.retries.append((now + self.retry_every_s, job))

    def step(self, now: float) -> list[RequestOutput] | None:
        for _, job in self.retries:
            if job.hopeless(now):
                job.dropped = "refused"
        self.retries = [(t, j) for t, j in self.retries if j.dropped is None]
        due = [j for t, j in self.retries if t <= now]
        self.retries = [(t, j) for t, j in self.retries if t > now]
        for job in due:
            self._try(job, now)
        drop_hopeless((i.engine for i in self.dev.instances.values()), self.jobs, now)
        grant, outs = self.dev.step()
        if self.wake_on_finish and self.retries:
            # As the activator does: a request of a function leaving its instance wakes that
            # function's waiting requests at once (its decode time and KV are free now).
            done = {self.jobs[o.rid].function for o in outs if o.finish_reason is not None and o.rid in self.jobs}
            if done:
                self.retries = [(min(t, now) if j.function in done else t, j) for t, j in self.retries]
        return None if grant is None else outs

    @property
    def busy(self) -> bool:
        return bool(self.retries) or self.dev.has_work

    def next_wakeup_s(self) -> float:
        return min((min(t, j.arrival_s + j.ttft_slo_s) for t, j in self.retries), default=math.inf)

    def warm(self) -> None:
        for inst in self.dev.instances.values():
            inst.engine.add_request(WARM_RID, WARM_PROMPT, WARM_PARAMS, 0.0)
        while self.dev.has_work:
            self.dev.step()
        self.dev.plan_memory()  # give the warm-up's KV back
        self.dev.stats = ArbiterStats()
        for inst in self.dev.instances.values():  # first steps are slow: keep them out of the estimates
            inst.estimator = LatencyEstimator(self.profile)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"admitted": self.admitted, "displaced": self.dev.stats.displaced,
                                 "arbiter_mean_us": round(self.dev.stats.mean_us, 1),
                                 "admit_mean_us": round(self.dev.stats.admit_mean_us, 1),
                                 "admit_max_ms": round(self.dev.stats.admit_max_s * 1e3, 2),
                                 "peak_kv_mb": round(self.dev.peak_kv_bytes / 2**20, 1)}
        out.update({f"refused_{k}": v for k, v in sorted(self.refusals.items())})
        return out

    def close(self) -> None:
        self.dev.instances.clear()


class OursNoAdmission(Ours):
    """Ours without admission: the same DeviceLoop (EDF, shared KV), every job accepted at once.
    Not a system to deploy (nothing protects the SLOs of jobs already running); it separates what
    EDF + shared memory give from what admission gives or costs."""

    name = "ours_noadmit"

    def _try(self, job: Job, now: float) -> None:
        self.dev.instances[job.function].engine.add_request(job.rid, job.prompt_ids, job.params, job.arrival_s)
        self.dev.plan_memory()
        self.admitted += 1
