"""A runtime pod: one device, its instances, the host weight cache, and the registry of
functions it serves. The wiring between the HTTP layer and the device thread.

The registry (name -> Served) is owned by the event loop; the device thread only reads whether
an instance admits (a dict lookup). Instance lifetimes follow runtime.core.lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functions import Dtype, FunctionSpec
from runtime.core.arbiter import MAX_PREFILL_STEP_S, DeviceKind
from runtime.core.estimator import LatencyEstimator, LatencyProfile
from runtime.core.lifecycle import TERMINAL, InstanceEvent, InstanceState, transition
from runtime.core.memory import ActionKind
from runtime.device import DeviceLoop, Instance
from runtime.device_thread import AsyncDevice, TickObserver
from runtime.engine.engine import EngineConfig, LLMEngine, RequestOutput, rss_bytes
from runtime.engine.profiler import profile_engine
from runtime.engine.structured import Grammars
from runtime.host_memory import MemoryReading, read_memory
from runtime.models.loader import LoadedModel
from runtime.weights_cache import HostWeightCache, InsufficientMemoryError

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which bfloat16 and int8
    functions need to be fast; None where /proc/cpuinfo cannot tell (not Linux)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


class PodError(Exception):
    def __init__(self, status: int, message: str, code: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.extra = extra or {}  # more fields of the error object (what a caller can act on)


@dataclass(frozen=True)
class PodConfig:
    device: DeviceKind = DeviceKind.CPU
    kv_budget_bytes: int = 1 << 30
    weight_cache_bytes: int = 4 << 30
    block_size: int = 16  # the prefix cache shares whole blocks: a short system prompt fills one
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_step_s: float = MAX_PREFILL_STEP_S  # a step carrying a prefill chunk ends within this
    displace: bool = True  # admission may hand back a longer waiting prompt to take a shorter one
    newcomer_slack: bool = True  # a newcomer's own first token is held to its SLO, not the 5% tighter plan
    prefix_caching: bool = True  # requests share the KV of prompt prefixes already computed
    profile_prefill: tuple[int, ...] = (32, 128)
    profile_decode: tuple[tuple[int, tuple[int, ...]], ...] = ((128, (1, 4)),)
    drain_timeout_s: float = 60.0
    # SIGTERM: running requests get this long to finish before the rest leave with continuations
    # (Kubernetes allows 30 s by default before it kills the pod)
    shutdown_drain_s: float = 10.0
    # what the pod may use in all, where its cgroup or the host do not say (None: read them)
    memory_limit_bytes: int | None = None
    # /healthz fails once the device thread has made no progress this long (a liveness probe then
    # restarts the pod): longer than any step or load's profile, which hold the thread
    stall_timeout_s: float = 60.0


@dataclass
class Served:
    spec: FunctionSpec
    state: InstanceState
    engine: LLMEngine | None = None  # read-only from the loop: tokenizer, limits
    loaded: LoadedModel | None = None
    load_s: float = 0.0
    weights_cached: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # The unload under way, owned by the pod (a caller that goes away does not stop it halfway);
    # a second unload or evict of the instance joins it rather than racing it.
    removal: asyncio.Task[dict[str, Any]] | None = None
    cut_drain: bool = False  # an evict arrived while it drained: what still runs leaves now

    @property
    def name(self) -> str:
        return self.spec.name


class Pod:
    def __init__(self, config: PodConfig, on_tick: TickObserver | None = None,
                 memory: Callable[[], MemoryReading] | None = None):
        self.config = config
        self.memory = memory or functools.partial(read_memory, config.memory_limit_bytes)
        self.weights = HostWeightCache(config.weight_cache_bytes)
        self.device = AsyncDevice(DeviceLoop(config.device, config.kv_budget_bytes,
                                             max_prefill_step_s=config.max_prefill_step_s,
                                             displace=config.displace,
                                             newcomer_slack=config.newcomer_slack), on_tick,
                                  admittable=self._admittable)
        self.served: dict[str, Served] = {}
        self._profiles: dict[str, LatencyProfile] = {}  # by model ref; device thread only
        self.terminating = False  # set by hand_off(): the pod is going away
        self._drain_until = math.inf  # hand_off() cuts every drain short at this time

    def _admittable(self, name: str) -> bool:
        s = self.served.get(name)
        return s is not None and s.state is InstanceState.READY

    def ready(self, name: str) -> Served:
        s = self.served.get(name)
        if s is None or s.state in TERMINAL:
            names = ", ".join(sorted(n for n, x in self.served.items() if x.state is InstanceState.READY))
            raise PodError(404, f"model '{name}' not found; available: {names}", "model_not_found")
        if s.state is not InstanceState.READY:
            raise PodError(503, f"function '{name}' is {s.state.value}; retry shortly", f"instance_{s.state.value}")
        return s

    def _set(self, s: Served, event: InstanceEvent) -> None:
        s.state = transition(s.state, event)

    # -- load ------------------------------------------------------------------------------
    async def load(self, spec: FunctionSpec, profile: bool = True) -> Served:
        if self.terminating:
            raise PodError(503, "this pod is shutting down", "pod_terminating")
        old = self.served.get(spec.name)
        if old is not None and old.state not in TERMINAL:
            raise PodError(409, f"function '{spec.name}' is already {old.state.value} here", "already_loaded")
        s = Served(spec, InstanceState.LOADING)
        self.served[spec.name] = s
        if spec.dtype is not Dtype.FLOAT32 and self.config.device is DeviceKind.CPU and cpu_has_bf16() is False:
            log.warning("function '%s' computes in %s, but this CPU has no bfloat16 instructions (AVX512-BF16, "
                        "AMX): it will use half the memory and run slower than float32", spec.name, spec.dtype.value)
        t0 = time.monotonic()
        # KV grows ahead of need up to the budget, so a load may not take what is not yet allocated
        kv_promised = await self.device.call(lambda dev: max(0, dev.actions.budget - dev.kv_bytes))
        try:
            loaded, cached = await asyncio.to_thread(self.weights.acquire, spec.model, spec.dtype,
                                                     lambda: self.memory().available_bytes - kv_promised)
        except InsufficientMemoryError as e:
            self._set(s, InstanceEvent.FAILED)
            raise PodError(507, f"cannot load model {spec.model!r} for '{spec.name}' here: {e}, with "
                                f"{kv_promised / (1 << 30):.2f} GiB of KV budget kept free",
                           "insufficient_memory",
                           {"weight_bytes": e.estimate.weight_bytes, "needed_bytes": e.estimate.peak_bytes,
                            "spare_bytes": max(0, e.room_bytes)}) from e
        except Exception as e:
            self._set(s, InstanceEvent.FAILED)
            raise PodError(400, f"cannot load model {spec.model!r}: {e}", "model_load_failed") from e
        grammars = Grammars.of(loaded.tokenizer, loaded.config.vocab_size)
        if spec.output_schema is not None:  # a schema the function promises must be one we can keep
            try:
                await asyncio.to_thread(grammars.compile, json.loads(spec.output_schema))
            except ValueError as e:
                self.weights.release(spec.checkpoint)
                self._set(s, InstanceEvent.FAILED)
                raise PodError(400, f"output_schema: {e}", "invalid_output_schema") from e
        try:
            s.engine = await self.device.call(lambda dev: self._install(dev, spec, loaded, profile, grammars))
        except Exception as e:
            self.weights.release(spec.checkpoint)
            self._set(s, InstanceEvent.FAILED)
            raise PodError(507, f"cannot place '{spec.name}' on this device: {e}", "insufficient_capacity") from e
        s.loaded, s.weights_cached, s.load_s = loaded, cached, time.monotonic() - t0
        self._set(s, InstanceEvent.LOADED)
        return s

    def _install(self, dev: DeviceLoop, spec: FunctionSpec, loaded: LoadedModel, profile: bool,
                 grammars: Grammars) -> LLMEngine:
        """Device thread: build the engine (no KV yet), profile it briefly on this device with
        KV borrowed from the budget through the action queue, then add it."""
        c = self.config
        eng = LLMEngine(loaded, EngineConfig(
            block_size=c.block_size, kv_cache_bytes=0, max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=min(spec.max_context_tokens, loaded.config.max_position),
            prefix_caching=c.prefix_caching), grammars=grammars)
        cached = self._profiles.get(spec.checkpoint)  # (a bfloat16 instance runs at its own speed)
        if cached is not None:  # same checkpoint, same device: its profile still holds
            prof = cached
        elif profile:
            tokens = max([*c.profile_prefill, *(ctx * max(b) + ctx for ctx, b in c.profile_decode)])
            blocks = -(-min(tokens, eng.max_model_len * c.max_num_seqs) // c.block_size)
            dev.reclaim(blocks * eng.bytes_per_block)
            a = dev.actions.submit(ActionKind.LOAD, spec.name, blocks * eng.bytes_per_block)
            if a not in dev.actions.ready():
                raise RuntimeError(f"no KV room to profile ({blocks} blocks)")
            eng.resize_kv(blocks)
            try:
                prof = profile_engine(eng, c.profile_prefill, c.profile_decode)
            finally:
                eng.resize_kv(0)
                dev.actions.complete(a.action_id)
                r = dev.actions.submit(ActionKind.SHRINK, spec.name, blocks * eng.bytes_per_block)
                dev.actions.complete(r.action_id)
            self._profiles[spec.checkpoint] = prof
        else:  # unprofiled: optimistic until observed steps correct it
            prof = LatencyProfile.from_tables([[1, 1.0]], [(1, [[1, 1.0]])])
        dev.add_instance(Instance(spec.name, spec, eng, LatencyEstimator(prof)))
        return eng

    # -- unload / evict ----------------------------------------------------------------------
    async def unload(self, name: str, drain: bool = True) -> dict[str, Any]:
        """Take the instance off the device: with ``drain``, its running requests finish first
        (up to ``drain_timeout_s``); what is left leaves with continuations. An unload already
        under way is joined (an evict cuts its drain short), so concurrent calls get one answer."""
        s = self._live(name)
        if s.removal is None:
            s.removal = asyncio.ensure_future(self._unload(s, drain))
        elif not drain:
            s.cut_drain = True
        return await asyncio.shield(s.removal)

    async def _unload(self, s: Served, drain: bool) -> dict[str, Any]:
        name = s.name
        try:
            if drain and s.state is InstanceState.READY:
                self._set(s, InstanceEvent.DRAIN)
                deadline = time.monotonic() + self.config.drain_timeout_s
                while await self.device.call(lambda dev: dev.instances[name].engine.has_work):
                    if s.cut_drain or time.monotonic() > min(deadline, self._drain_until):
                        break  # what is still running is evicted with continuations below
                    await asyncio.sleep(0.02)
            evicted = await self.device.call_delivering(lambda dev: self._remove(dev, name))
        except BaseException:
            s.removal = None  # (not removed: a later unload tries again)
            raise
        drained = s.state is InstanceState.DRAINING and not evicted
        self._set(s, InstanceEvent.DRAINED if drained else InstanceEvent.EVICT)
        s.engine = None
        s.loaded = None
        self.weights.release(s.spec.checkpoint)  # last: it trims the heap, which must see the weights freed
        return {"name": name, "state": s.state.value, "evicted_requests": evicted, "rss_bytes": rss_bytes()}

    async def evict(self, name: str) -> dict[str, Any]:
        return await self.unload(name, drain=False)

    async def hand_off(self, drain_s: float | None = None) -> int:
        """The pod is going away (SIGTERM: a rolling update, a node drain, scale-in): take no more
        work, let running requests finish for up to ``drain_s`` (default: the config's
        ``shutdown_drain_s``), and evict what is left, so it leaves with continuations, as when
        preempted, and the activator continues it on other pods instead of the streams breaking
        when the process ends. Returns the requests handed off."""
        self.terminating = True
        self._drain_until = time.monotonic() + (self.config.shutdown_drain_s if drain_s is None else drain_s)
        ready = [name for name, s in self.served.items() if s.state is InstanceState.READY]
        done = await asyncio.gather(*(self.unload(name) for name in ready))  # every instance drains at once
        while any(s.state is InstanceState.DRAINING for s in self.served.values()):
            await asyncio.sleep(0.02)  # a scale-down's drain, cut short by _drain_until
        return sum(int(d["evicted_requests"]) for d in done)

    def end_drains(self) -> None:
        """Cut every drain short now (a second Ctrl-C): what still runs is handed off at once."""
        self._drain_until = -math.inf

    def _live(self, name: str) -> Served:
        s = self.served.get(name)
        if s is None or s.state in TERMINAL or s.state is InstanceState.LOADING:
            raise PodError(404, f"no loaded instance '{name}' here", "instance_not_found")
        return s

    @staticmethod
    def _remove(dev: DeviceLoop, name: str) -> tuple[int, list[RequestOutput]]:
        _, outs = dev.remove_instance(name)
        return len(outs), outs

    # -- status ------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        dev_status = await self.device.call(_device_status)
        states = {n: {"state": s.state.value, "model": s.spec.checkpoint, "digest": s.spec.instance_digest,
                      "load_s": round(s.load_s, 3), "weights_cached": s.weights_cached}
                  for n, s in self.served.items()}
        for inst in dev_status["instances"]:
            inst.update(states.get(inst["name"], {}))
        cache = self.weights.status()
        return {**dev_status, "functions": states, "weights_cache": cache, "rss_bytes": rss_bytes(),
                "memory": self._memory_status(dev_status["device"], cache), "terminating": self.terminating}

    def _memory_status(self, device: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
        """The host memory, and what a load could take (the autoscaler places by it): now (idle
        cached weights dropped, the KV budget not yet allocated kept free), and at most (every
        instance unloaded too; the whole KV budget kept free)."""
        mem = self.memory()
        models = cache["models"]
        idle = sum(m["bytes"] for m in models if m["pins"] == 0)
        kv_budget, kv_held = device["kv_budget_bytes"], device["kv_bytes"]
        return {"limit_bytes": mem.limit_bytes, "available_bytes": mem.available_bytes, "source": mem.source,
                "load_room_bytes": max(0, mem.available_bytes - max(0, kv_budget - kv_held) + idle),
                "most_room_bytes": max(0, mem.available_bytes + sum(m["bytes"] for m in models) + kv_held - kv_budget)}


def _device_status(dev: DeviceLoop) -> dict[str, Any]:
    out = []
    for inst in dev.instances.values():
        eng, load = inst.engine, inst.load()
        est = inst.estimator
        out.append({
            "name": inst.iid, "batch": eng.scheduler.num_running, "waiting": eng.scheduler.num_waiting,
            "demand": round(load.demand(), 4),
            "kv_blocks_total": eng.kv_blocks_total, "kv_blocks_used": eng.kv_blocks_used,
            "kv_blocks_reserved": eng.reserved_blocks(dev.memory.lookahead_tokens),
            "kv_bytes": eng.cache.nbytes, "block_size": eng.config.block_size,
            # held only for cached prompt prefixes, given back on demand: free to a placement
            "kv_lent_bytes": inst.lent_blocks(eng.reserved_blocks(dev.memory.lookahead_tokens)) * eng.bytes_per_block,
            "prefix_cache": {"cached_blocks": eng.pool.num_cached, "hit_tokens": eng.scheduler.kv.hit_tokens,
                             "queried_tokens": eng.scheduler.kv.queried_tokens},
            "profile": {"prefill_ms": est.profile.prefill_ms, "decode_ms": est.profile.decode_ms,
                        "prefill_factor": round(est.prefill_factor, 3), "decode_factor": round(est.decode_factor, 3)},
        })
    return {
        "device": {"kind": dev.kind.value, "cpu_bf16": cpu_has_bf16(), "kv_budget_bytes": dev.actions.budget,
                   "kv_bytes": dev.kv_bytes,
                   "kv_free_bytes": dev.actions.free, "kv_peak_bytes": dev.peak_kv_bytes,
                   "arbiter_decisions": dev.stats.decisions, "arbiter_mean_us": round(dev.stats.mean_us, 2),
                   "admission_handed_back": dev.stats.displaced,
                   "admission_decisions": dev.stats.admissions,
                   "admission_mean_us": round(dev.stats.admit_mean_us, 2),
                   "admission_max_us": round(dev.stats.admit_max_s * 1e6, 1)},
        "instances": out,
    }
