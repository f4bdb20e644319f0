"""Which instance a request for a function should try first.

Reactive bin-packing: the instance with the largest batch first, so load concentrates on few
instances and small ones drain and expire under keep-alive. Loading instances are skipped (they
do not admit yet). Ties break by instance id. The caller (the activator) tries the list in order;
whether a request may join is the pod's admission decision, not ours.

``round_robin_order`` is the exclusive baseline's rule instead (the SLINFER artifact's
ServerlessLLM: each request tries the function's instances in turn, starting after the one that
took the last request), which spreads load and keeps every instance busy.

``device_order`` (e.g. GPU then CPU) puts instances on earlier device kinds first, largest batch
first within each kind. The same bin-packing, across device kinds: a GPU's decode step barely grows
with the batch (A100, 7B: 14 ms at batch 1, ~20 ms at 32) while a CPU's grows fast and its prefill
is ~6x slower, so a function running on both should fill its GPU instance and let the CPU one
drain, giving the CPU back to functions that have no GPU instance. Kinds not listed come last.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoscaler.core.snapshot import ClusterSnapshot, DeviceKind, FunctionId, InstanceView

__all__ = ["round_robin_order", "route_order"]


def route_order(snapshot: ClusterSnapshot, function: FunctionId, *,
                device_order: Sequence[DeviceKind] = ()) -> list[InstanceView]:
    """The function's ready instances: by position of their node's kind in ``device_order``, then
    largest batch first, then by instance id."""
    rank = {kind: i for i, kind in reversed(list(enumerate(device_order)))}
    return sorted(_ready(snapshot, function), key=lambda i: (rank.get(snapshot.node(i.node_id).kind, len(rank)), -i.batch,
                                        i.instance_id))


def round_robin_order(snapshot: ClusterSnapshot, function: FunctionId, last: str | None) -> list[InstanceView]:
    """The function's ready instances by instance id, starting after ``last`` (the instance that
    took the function's previous request, whether or not it is still there; None: from the first)."""
    ready = sorted(_ready(snapshot, function), key=lambda i: i.instance_id)
    if last is None:
        return ready
    k = next((n for n, i in enumerate(ready) if i.instance_id > last), 0)
    return ready[k:] + ready[:k]


def _ready(snapshot: ClusterSnapshot, function: FunctionId) -> list[InstanceView]:
    """The function's instances that admit requests (a loading one does not yet)."""
    return [i for i in snapshot.instances if i.function == function and not i.loading]
