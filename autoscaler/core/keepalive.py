"""Scale to zero: which idle instances to unload now.

An instance with no requests since ``idle_since_s`` expires once it has been idle for at least its
function's ``keep_alive_s`` (0 unloads it as soon as it is idle). An instance still loading never
expires, nor does one with requests (``idle_since_s`` is None). An instance whose function is no
longer deployed expires as soon as it is idle. Order: longest idle first, then by instance id.
"""

from __future__ import annotations

from autoscaler.core.snapshot import ClusterSnapshot, InstanceView

__all__ = ["expired"]


def expired(snapshot: ClusterSnapshot) -> list[InstanceView]:
    """Instances to unload at ``snapshot.now_s``."""
    due: list[tuple[float, str, InstanceView]] = []
    for inst in snapshot.instances:
        if inst.loading or inst.idle_since_s is None:
            continue
        fn = snapshot.find_function(inst.function)
        keep_alive_s = fn.keep_alive_s if fn is not None else 0.0
        if snapshot.now_s - inst.idle_since_s >= keep_alive_s:
            due.append((inst.idle_since_s, inst.instance_id, inst))
    return [inst for _, _, inst in sorted(due, key=lambda d: (d[0], d[1]))]
