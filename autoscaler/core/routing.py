"""Which instance a request for a function should try first.

Reactive bin-packing: the instance with the largest batch first, so load concentrates on few
instances and small ones drain and expire under keep-alive. Loading instances are skipped (they
do not admit yet). Ties break by instance id. The caller (the activator) tries the list in order;
whether a request may join is the pod's admission decision, not ours.
"""

from __future__ import annotations

from autoscaler.core.snapshot import ClusterSnapshot, FunctionId, InstanceView

__all__ = ["route_order"]


def route_order(snapshot: ClusterSnapshot, function: FunctionId) -> list[InstanceView]:
    """The function's ready instances, largest batch first, then by instance id."""
    ready = (i for i in snapshot.instances if i.function == function and not i.loading)
    return sorted(ready, key=lambda i: (-i.batch, i.instance_id))
