"""Prometheus metrics for one runtime server (own registry, so several servers can share a
process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.core.arbiter import Grant
from runtime.device import DeviceLoop
from runtime.engine.engine import LLMEngine

_LAT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("slinfer_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=_LAT_BUCKETS, registry=r)
        self.itl = Histogram("slinfer_inter_token_latency_seconds", "Time between output tokens", ["model"],
                             buckets=_LAT_BUCKETS, registry=r)
        self.step = Histogram("slinfer_engine_step_seconds", "Duration of one engine iteration", ["model"],
                              buckets=_LAT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slinfer_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.output_tokens = Counter("slinfer_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.requests = Counter("slinfer_requests", "Finished requests", ["model", "finish_reason"], registry=r)
        self.errors = Counter("slinfer_request_errors", "Requests answered with an error", ["code"], registry=r)
        self.running = Gauge("slinfer_requests_running", "Requests in the running batch", ["model"], registry=r)
        self.waiting = Gauge("slinfer_requests_waiting", "Requests waiting to run", ["model"], registry=r)
        self.kv_used = Gauge("slinfer_kv_blocks_used", "KV cache blocks in use", ["model"], registry=r)
        self.kv_total = Gauge("slinfer_kv_blocks_total", "KV cache blocks in the pool", ["model"], registry=r)
        self.kv_cached = Gauge("slinfer_kv_blocks_cached", "Free KV blocks still holding a cached prompt prefix",
                               ["model"], registry=r)
        self.prefix_hits = Counter("slinfer_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
                                   "(not computed again)", ["model"], registry=r)
        self._hits_seen: dict[str, int] = {}  # per model: the engine's cumulative count last observed
        self.kv_device_bytes = Gauge("slinfer_device_kv_bytes", "KV bytes held by all instances", registry=r)
        self.kv_budget_bytes = Gauge("slinfer_device_kv_budget_bytes", "The device's KV budget", registry=r)
        self.arbiter = Histogram("slinfer_arbiter_decision_seconds", "Cost of one EDF arbiter decision",
                                 buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2),
                                 registry=r)
        self.refusals = Counter("slinfer_admission_refusals", "Requests refused by admission",
                                ["model", "reason"], registry=r)
        # the paper's score, live: judged where a request finishes (a preempted one where it goes on)
        self.slo = Counter("slinfer_slo_requests", "Finished requests by how they did against the function's SLO "
                           "(waits for a model load excused)", ["model", "outcome"], registry=r)

    def observe_device(self, dev: DeviceLoop, grant: Grant | None, seconds: float) -> None:
        """Called from the device thread after each grant (prometheus-client is thread-safe)."""
        if grant is not None:
            self.arbiter.observe(dev.stats.last_s)
            self.step.labels(grant.instance_id).observe(seconds)
        for iid, inst in list(dev.instances.items()):
            self.observe_engine(iid, inst.engine)
        self.kv_device_bytes.set(dev.kv_bytes)
        self.kv_budget_bytes.set(dev.actions.budget)

    def observe_engine(self, model: str, engine: LLMEngine, step_s: float | None = None) -> None:
        """Called from the engine thread after each step (prometheus-client is thread-safe)."""
        if step_s is not None:
            self.step.labels(model).observe(step_s)
        self.running.labels(model).set(engine.scheduler.num_running)
        self.waiting.labels(model).set(engine.scheduler.num_waiting)
        self.kv_used.labels(model).set(engine.kv_blocks_used)
        self.kv_total.labels(model).set(engine.kv_blocks_total)
        self.kv_cached.labels(model).set(engine.pool.num_cached)
        hits, seen = engine.scheduler.kv.hit_tokens, self._hits_seen.get(model, 0)
        self.prefix_hits.labels(model).inc(hits - seen if hits >= seen else hits)  # a new engine counts from 0
        self._hits_seen[model] = hits
