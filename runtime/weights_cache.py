"""Host-memory cache of loaded model weights, bounded in bytes, LRU among unpinned entries.

An instance pins its model while it lives; unloading unpins it, and the weights stay cached (a
re-load then skips disk and conversion) until the cache needs the room. Two instances of the
same checkpoint share one set of weights but have their own engines, KV and requests.
Used from the event loop thread only (loads run in a worker thread, one at a time per ref).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from functions import Dtype, checkpoint_key
from runtime.engine.engine import release_memory
from runtime.models.loader import LoadedModel, LoadEstimate, estimate_load, load_model


class InsufficientMemoryError(Exception):
    """A load refused before it started: its estimate does not fit in the room there is."""

    def __init__(self, estimate: LoadEstimate, room_bytes: int):
        gib = 1 << 30
        super().__init__(f"loading it takes up to {estimate.peak_bytes / gib:.2f} GiB of host memory "
                         f"({estimate.weight_bytes / gib:.2f} GiB once loaded); this pod has "
                         f"{max(0, room_bytes) / gib:.2f} GiB to spare")
        self.estimate = estimate
        self.room_bytes = room_bytes


@dataclass
class _Entry:
    loaded: LoadedModel
    nbytes: int
    pins: int = 0


class HostWeightCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()  # loads happen in worker threads; room() may read status()
        self.hits = 0
        self.misses = 0

    def acquire(self, ref: str, dtype: Dtype = Dtype.FLOAT32,
                room: Callable[[], int] | None = None) -> tuple[LoadedModel, bool]:
        """Pin the model for ref in dtype, loading it if needed. Returns (model, was_cached).
        Entries are named by ``functions.checkpoint_key``. Before a load from disk, its estimate
        (``estimate_load``) must fit in ``room()`` (bytes it may take now): unpinned entries are
        dropped, least recently used first, until it does; where even dropping them all would not
        do, nothing is dropped and ``InsufficientMemoryError`` is raised."""
        key = checkpoint_key(ref, dtype)
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                e.pins += 1
                self._entries.move_to_end(key)
                self.hits += 1
                return e.loaded, True
            self.misses += 1
            if room is not None:
                self._make_room(estimate_load(ref, dtype), room)
            loaded = load_model(ref, dtype)
            release_memory()  # the load's conversions (file dtype -> dtype, int8 quantization) freed copies
            self._entries[key] = _Entry(loaded, loaded.model.nbytes, pins=1)
            self._trim()
            return loaded, False

    def release(self, key: str) -> None:
        """Unpin the entry ``key`` (``functions.checkpoint_key``) names."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.pins == 0:
                raise ValueError(f"{key!r} is not pinned")
            e.pins -= 1
            del e  # else this frame keeps a dropped entry's weights alive through the trim below
            self._trim()
        release_memory()

    def _make_room(self, estimate: LoadEstimate, room: Callable[[], int]) -> None:
        have = room()
        if estimate.peak_bytes <= have:
            return
        idle = [k for k, e in self._entries.items() if e.pins == 0]  # least recently used first
        if estimate.peak_bytes > have + sum(self._entries[k].nbytes for k in idle):
            raise InsufficientMemoryError(estimate, have)
        for key in idle:
            del self._entries[key]
            release_memory()
            have = room()
            if estimate.peak_bytes <= have:
                return
        raise InsufficientMemoryError(estimate, have)

    def _trim(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for ref in list(self._entries):
            if total <= self.max_bytes:
                break
            e = self._entries[ref]
            if e.pins == 0:
                total -= e.nbytes
                del self._entries[ref]
            del e

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "max_bytes": self.max_bytes,
                "bytes": sum(e.nbytes for e in self._entries.values()),
                "hits": self.hits, "misses": self.misses,
                "models": [{"ref": r, "bytes": e.nbytes, "pins": e.pins} for r, e in self._entries.items()],
            }
