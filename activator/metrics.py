"""The activator's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ActivatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slinfer_activator_requests", "Requests by function and HTTP status",
                                ["function", "status"], registry=r)
        self.errors = Counter("slinfer_activator_errors", "Error answers by function and error code",
                              ["function", "code"], registry=r)
        self.queue_depth = Gauge("slinfer_activator_queue_depth", "Requests waiting for capacity",
                                 ["function"], registry=r)
        self.wait = Histogram("slinfer_activator_wait_seconds", "Time a request waited for an instance",
                              ["function"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slinfer_activator_ttft_seconds", "Time to first streamed byte of output",
                              ["function"], buckets=_LATENCY_BUCKETS, registry=r)
        self.moves = Counter("slinfer_activator_continuations", "Preempted requests continued elsewhere",
                             ["function"], registry=r)
        self.failovers = Counter("slinfer_activator_failovers",
                                 "Streams continued elsewhere after their instance died mid-stream",
                                 ["function"], registry=r)
