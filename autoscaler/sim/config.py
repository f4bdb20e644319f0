"""What the simulator runs: a model on a cluster, under one system's configuration.

Every system is a configuration of the SAME code (autoscaler/core for placement, routing,
preemption and keep-alive; runtime/core for the per-device arbiter, admission and memory planner).
What each baseline models, after the SLINFER paper's description (../shared/PAPER.md):

  sllm      ServerlessLLM, exclusive allocation: each GPU runs at most one instance, which owns the
            whole GPU (weights + all the rest as a static KV cache); requests join it up to the
            profile's ``sllm_concurrency`` batch cap (no SLO-aware admission: vLLM continuous
            batching), FCFS prefill; a function's requests go to its instances in turn
            (round robin, as the artifact's ServerlessLLM routes); no preemption; no CPU nodes.
  sllm+c    the same exclusive allocation, CPU nodes allowed (tried first, as every system here),
            with the CPU profile's cap.
  sllm+c+s  static 2-way sharing: every node is split into 2 fixed slots, each with half the memory
            and half the compute (GPU compute capped at 50%, e.g. with MPS; on a CPU half the
            cores), step times therefore doubled; at most one instance per slot (so <= 2 per node),
            batch cap ``sllm_share_concurrency["2"]``.
  slinfer   ours: instances share a device token by token (EDF arbiter), SLO-aware admission
            (compute, prefill replay, memory), forward-looking KV sizing with a watermark, reactive
            bin-packing (GPU instances before CPU ones, then largest batch first), CPU first /
            busiest node first placement, proactive preemption (sparing the instances of
            functions with more requests per second lately), idle CPU instances kept loaded
            until their memory is needed (``autoscaler.core.keepalive``); inside an instance
            the earliest deadline first too (a prompt before an earlier-started one, a prompt
            before the batch's next token only when it is due sooner), as our engine and the
            admission replay order them.
Every system places a new instance on a node whose host memory holds the checkpoint first
(ServerlessLLM's locality-aware placement, ``autoscaler.core.placement``).
Ablations of slinfer (suffixes, combinable): ``-nopreempt``, ``-nocpu``, ``-nowatermark``
(watermark 1.0: KV sized to the reservation exactly), ``-balance`` (spread instances over the least
busy nodes instead of packing), ``-nohold`` (idle CPU instances unload after ``keep_alive_s`` like
GPU ones), ``-batchroute`` (route by batch only, whatever the device), ``-nocache`` (placement
ignores the host caches), ``-nodisplace`` (admission never hands back a waiting prompt),
``-norate`` (preemption does not see functions' arrival rates), ``-noslack`` (a newcomer's own
first token is planned against the 5%-tighter deadline, as admitted work's, not its SLO).

Every system shares the same front end: a request no instance takes waits in the cluster queue, is
retried every ``retry_s`` (the artifact's 0.25 s) and dropped once its TTFT deadline (plus any
model-load wait) has passed; idle instances unload after ``keep_alive_s``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from autoscaler.core.rates import DEFAULT_RATE_WINDOW_S
from runtime.core.arbiter import DeviceKind
from runtime.core.estimator import LatencyProfile

GIB = 1 << 30


class Admission(enum.Enum):
    SLO = "slo"  # runtime.core.admission.admit: compute, prefill replay, memory
    BATCH_CAP = "batch_cap"  # join while the instance holds fewer requests than the cap


class BatchCap(enum.Enum):
    NONE = "none"
    EXCLUSIVE = "exclusive"  # the profile's sllm_concurrency
    SHARED2 = "shared2"  # the profile's sllm_share_concurrency["2"]


@dataclass(frozen=True)
class SystemConfig:
    name: str
    pools: tuple[DeviceKind, ...] = (DeviceKind.CPU, DeviceKind.GPU)  # placement order
    slots_per_node: int = 1  # static partitions of a node, each a virtual device
    static_memory: bool = False  # an instance holds its whole slot (weights + fixed KV)
    compute_share: float = 1.0  # fraction of the device's compute one slot gets
    admission: Admission = Admission.SLO
    batch_cap: BatchCap = BatchCap.NONE
    preempt: bool = True
    balance: bool = False
    route_device_order: tuple[DeviceKind, ...] = ()  # routing: instances on these kinds first
    round_robin: bool = False  # routing: the function's instances in turn, not largest batch first
    hold_idle: tuple[DeviceKind, ...] = ()  # kinds whose idle instances stay until evicted
    cache_aware: bool = True  # placement sees which checkpoints each node's host memory holds
    watermark: float = 1.25
    lookahead_tokens: int = 512
    min_instance_tokens: int = 4096  # KV an active instance keeps (the paper's floor)
    keep_alive_s: float = 1.0  # the artifact's GPU keep-alive; used on every node (see simulator doc)
    retry_s: float = 0.25  # the artifact's retry period for waiting requests
    # Admission sees each request's output bound (max_tokens = its trace output length, as the
    # artifact's client sends it) and replays the device until all work ends; False: outputs
    # unbounded, replay to the last prefill deadline plus the steady-state compute rule.
    bounded_outputs: bool = True
    # Prefill chunk per iteration: our runtime's engine chunks at 512 tokens (and admission replays
    # that way); None = a whole prompt per iteration, as the artifact's vLLM 0.5.2 baselines.
    prefill_chunk_tokens: int | None = 512
    # Inside an instance, prompts by first-token deadline, a started one overtaken by one due sooner
    # (our engine, and the order admission replays); False: FCFS, as vLLM 0.5's scheduler.
    prefill_by_deadline: bool = True
    # Admission may hand back a longer waiting prompt (no token out yet) to admit a shorter one
    # (runtime.core.admission.displacing); the handed-back request is routed again.
    displace: bool = True
    # Admission plans a newcomer's own first token against its SLO rather than the 5%-tighter
    # planning deadline (runtime.core.admission.NewRequest.own_slack_s).
    newcomer_slack: bool = True
    # Requests per second per function over this window (what the activator reports) reach the
    # autoscaler's snapshot; preemption spares busier functions' instances. 0: no rates.
    rate_window_s: float = DEFAULT_RATE_WINDOW_S

    def __post_init__(self) -> None:
        if (self.slots_per_node < 1 or not 0 < self.compute_share <= 1 or self.retry_s <= 0
                or self.rate_window_s < 0):
            raise ValueError(f"invalid system config: {self}")
        if not self.pools:
            raise ValueError(f"system {self.name!r} has no device pools")


SLLM = SystemConfig("sllm", pools=(DeviceKind.GPU,), static_memory=True, admission=Admission.BATCH_CAP,
                    batch_cap=BatchCap.EXCLUSIVE, preempt=False, round_robin=True, prefill_chunk_tokens=None,
                    prefill_by_deadline=False, displace=False, newcomer_slack=False)
SLLM_C = replace(SLLM, name="sllm+c", pools=(DeviceKind.CPU, DeviceKind.GPU))
SLLM_C_S = replace(SLLM_C, name="sllm+c+s", slots_per_node=2, compute_share=0.5, batch_cap=BatchCap.SHARED2)
SLINFER = SystemConfig("slinfer", route_device_order=(DeviceKind.GPU, DeviceKind.CPU), hold_idle=(DeviceKind.CPU,))

PRESETS: dict[str, SystemConfig] = {c.name: c for c in (SLLM, SLLM_C, SLLM_C_S, SLINFER)}
ABLATIONS = ("nopreempt", "nocpu", "nowatermark", "balance", "nohold", "batchroute", "nocache", "nodisplace",
             "norate", "noslack")


def system_config(name: str) -> SystemConfig:
    """A preset by name, or slinfer with ablation suffixes (``slinfer-nopreempt-balance``)."""
    if name in PRESETS:
        return PRESETS[name]
    base, *flags = name.split("-")
    if base != "slinfer" or not flags or any(f not in ABLATIONS for f in flags):
        raise ValueError(f"unknown system {name!r}; known: {', '.join(PRESETS)}, or slinfer-<ablation>... "
                         f"with ablations {', '.join(ABLATIONS)}")
    cfg = replace(SLINFER, name=name)
    for f in flags:
        if f == "nopreempt":
            cfg = replace(cfg, preempt=False)
        elif f == "nocpu":
            cfg = replace(cfg, pools=(DeviceKind.GPU,))
        elif f == "nowatermark":
            cfg = replace(cfg, watermark=1.0)
        elif f == "nohold":
            cfg = replace(cfg, hold_idle=())
        elif f == "batchroute":
            cfg = replace(cfg, route_device_order=())
        elif f == "nocache":
            cfg = replace(cfg, cache_aware=False)
        elif f == "nodisplace":
            cfg = replace(cfg, displace=False)
        elif f == "noslack":
            cfg = replace(cfg, newcomer_slack=False)
        elif f == "norate":
            cfg = replace(cfg, rate_window_s=0.0)
        else:
            cfg = replace(cfg, balance=True)
    return cfg


@dataclass(frozen=True)
class DeviceProfile:
    """One model on one device kind: measured step latencies (``true``, no safety factor: what the
    simulated device takes), the estimator's profile (with the authors' safety factor: what
    admission believes) and the exclusive / 2-way shared batch caps."""

    true: LatencyProfile
    estimate: LatencyProfile
    sllm_cap: int
    sllm_share_cap: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    block_tokens: Mapping[DeviceKind, int]
    devices: Mapping[DeviceKind, DeviceProfile]
    decode_quota_gpu: int = 1  # iterations per GPU decode grant (4 for 3B, 2 for 7B, 1 for 13B)
    max_context_tokens: int = 4096

    def cap(self, kind: DeviceKind, which: BatchCap) -> int | None:
        if which is BatchCap.NONE:
            return None
        p = self.devices[kind]
        return p.sllm_cap if which is BatchCap.EXCLUSIVE else p.sllm_share_cap


# The paper's per-model GPU decode quota (PAPER.md: 4 for 3B, 2 for 7B, 1 for 13B; 8B as 7B).
DECODE_QUOTA = {"llama-3.2-3b": 4, "llama-2-7b": 2, "llama-3.1-8b": 2, "llama-2-13b": 1}


def model_from_published(data: Mapping[str, Any], model: str) -> ModelSpec:
    """The model's entry of slinfer_published.json: 'cpu' (32-core AMX Xeon) and 'gpu' (A100-80GB)."""
    models = data.get("models", {})
    if model not in models:
        raise KeyError(f"model {model!r} not in the profile; available: {', '.join(sorted(models))}")
    m = models[model]
    devices: dict[DeviceKind, DeviceProfile] = {}
    for kind in DeviceKind:
        p = m["profiles"].get(kind.value)
        if p is None:
            continue
        share = (p.get("sllm_share_concurrency") or {}).get("2")
        devices[kind] = DeviceProfile(
            true=LatencyProfile.from_published(data, model, kind.value, safety=1.0),
            estimate=LatencyProfile.from_published(data, model, kind.value),
            sllm_cap=int(p["sllm_concurrency"]), sllm_share_cap=int(share if share is not None else 1))
    blocks = m.get("kv_block_tokens", {})
    return ModelSpec(name=model, weight_bytes=int(m["weights_gb"] * GIB),
                     kv_bytes_per_token=int(m["kv_kb_per_token"]) * 1024,
                     block_tokens={k: int(blocks.get(k.value, 16 if k is DeviceKind.GPU else 32)) for k in DeviceKind},
                     devices=devices, decode_quota_gpu=DECODE_QUOTA.get(model, 1))


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes and the load-time model. Memory: an A100-80GB with vLLM's default 90% usable; a CPU
    node's memory for instances is our assumption (the paper's hosts are not specified beyond 32
    AMX cores; 256 GiB is a common size for such a server). Host cache: each node keeps recently
    used checkpoints in DRAM (LRU), 256 GiB (assumption)."""

    cpus: int = 4
    gpus: int = 4
    gpu_memory_bytes: int = int(80 * GIB * 0.9)
    cpu_memory_bytes: int = 256 * GIB
    host_cache_bytes: int = 256 * GIB

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0 or self.cpus + self.gpus == 0:
            raise ValueError(f"a cluster needs at least one node, got {self.cpus} CPUs and {self.gpus} GPUs")
