"""Host-memory cache of loaded model weights, bounded in bytes, LRU among unpinned entries.

An instance pins its model while it lives; unloading unpins it, and the weights stay cached (a
re-load then skips disk and conversion) until the cache needs the room. Two instances of the
same checkpoint share one set of weights but have their own engines, KV and requests.
Used from the event loop thread only (loads run in a worker thread, one at a time per ref).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from functions import Dtype, checkpoint_key
from runtime.engine.engine import release_memory
from runtime.models.loader import LoadedModel, load_model


@dataclass
class _Entry:
    loaded: LoadedModel
    nbytes: int
    pins: int = 0


class HostWeightCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # loads happen in worker threads
        self.hits = 0
        self.misses = 0

    def acquire(self, ref: str, dtype: Dtype = Dtype.FLOAT32) -> tuple[LoadedModel, bool]:
        """Pin the model for ref in dtype, loading it if needed. Returns (model, was_cached).
        Entries are named by ``functions.checkpoint_key``."""
        key = checkpoint_key(ref, dtype)
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                e.pins += 1
                self._entries.move_to_end(key)
                self.hits += 1
                return e.loaded, True
            self.misses += 1
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
