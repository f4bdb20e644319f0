"""How long loading a model instance takes: a bandwidth model with a per-node host-memory cache.

    load_s = overhead_s + weight_bytes / bandwidth
    bandwidth (GB/s, 1e9 bytes)   from the node's host cache    from disk
      GPU node                    24  pinned host -> A100 over PCIe 4.0 x16 (32 GB/s theoretical;
                                      ServerlessLLM's loader runs close to PCIe bandwidth)
      CPU node                   inf  no copy: the instance computes on the cached weights in
                                      place, as our runtime pod does (runtime.weights_cache
                                      hands a cached model to the new instance; building its
                                      engine is the overhead)
      either                                                        5  one NVMe PCIe 4.0 SSD,
                                                                      sequential read (spec sheets)
A checkpoint read from disk enters the node's host cache (LRU by last use, bounded in bytes); the
cache starts empty, so every function's first load on a node comes from disk. A load counts in the
TTFT of every request that waited for it (the simulator's default score).

``LoadSource`` chooses where checkpoints come from. ``TIERED`` (the default) is the above.
``HOST_POOL`` is the SLINFER artifact's GPU loader: every checkpoint already sits in each host's
pinned memory pool, so every load runs at host-memory bandwidth and none touches disk (CPU loads
cost only the overhead, as the artifact's, which were free). ``INSTANT``: loads take no time,
which bounds how much of a result is cold-start cost. Both are for analysis; neither is a claim about a real cluster.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass

from runtime.core.arbiter import DeviceKind

GB = 1e9


class LoadSource(enum.Enum):
    TIERED = "tiered"  # the node's host cache, else disk
    HOST_POOL = "host-pool"  # every checkpoint in every host's memory pool
    INSTANT = "instant"  # no load time at all


@dataclass(frozen=True)
class LoadModel:
    gpu_cache_gbps: float = 24.0
    cpu_cache_gbps: float = math.inf  # zero copy (see the module doc); 12.0 until 2026-11-24
    disk_gbps: float = 5.0
    overhead_s: float = 0.0
    source: LoadSource = LoadSource.TIERED

    def from_host_memory(self, cached: bool) -> bool:
        """Whether a load reads host memory (not disk), given whether the node's LRU cache held it."""
        return cached or self.source is not LoadSource.TIERED

    def load_s(self, kind: DeviceKind, weight_bytes: int, cached: bool) -> float:
        if self.source is LoadSource.INSTANT:
            return 0.0
        if self.from_host_memory(cached):
            bw = self.gpu_cache_gbps if kind is DeviceKind.GPU else self.cpu_cache_gbps
        else:
            bw = self.disk_gbps
        return self.overhead_s + weight_bytes / (bw * GB)


class HostCache:
    """Checkpoints held in one node's DRAM, least recently used evicted first."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, int] = OrderedDict()
        self._keys: frozenset[str] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> frozenset[str]:
        """The checkpoints held now (a frozen copy, rebuilt only after a change)."""
        if self._keys is None:
            self._keys = frozenset(self._items)
        return self._keys

    def touch(self, key: str, nbytes: int) -> bool:
        """Use checkpoint ``key``: True when it was cached; it is cached (most recent) afterwards
        unless it is larger than the whole cache."""
        hit = key in self._items
        if hit:
            self._items.move_to_end(key)
            return True
        if nbytes > self.capacity_bytes:
            return False
        self._keys = None
        while sum(self._items.values()) + nbytes > self.capacity_bytes:
            self._items.popitem(last=False)
        self._items[key] = nbytes
        return False
