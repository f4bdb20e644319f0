"""Scale to zero: which idle instances to unload now.

An instance with no requests since ``idle_since_s`` expires once it has been idle for at least its
function's ``keep_alive_s`` (0 unloads it as soon as it is idle). An instance still loading never
expires, nor does one with requests (``idle_since_s`` is None). An instance whose function is no
longer deployed expires as soon as it is idle. Order: longest idle first, then by instance id.

``hold`` names device kinds whose idle instances never expire by time: they stay loaded until a
placement needs their memory, and then go first (an idle instance is the cheapest victim,
``plan.decide``). This is for CPU nodes: an idle instance takes no compute there (the arbiter only
runs instances with work), memory is plentiful (256 GiB hold ~15 7B instances), and an unloaded
one may have to come back from disk (seconds, in the next request's TTFT) once its checkpoint has
left the host cache; a held one keeps it there. (The SLINFER
artifact unloaded idle CPU instances at once, but its CPU "cold start" was free: every CPU slot
kept one shared checkpoint loaded.)
"""

from __future__ import annotations

from collections.abc import Collection

from autoscaler.core.snapshot import ClusterSnapshot, DeviceKind, InstanceView

__all__ = ["expired"]


def expired(snapshot: ClusterSnapshot, *, hold: Collection[DeviceKind] = ()) -> list[InstanceView]:
    """Instances to unload at ``snapshot.now_s``; idle instances on ``hold`` kinds stay."""
    due: list[tuple[float, str, InstanceView]] = []
    for inst in snapshot.instances:
        if inst.loading or inst.idle_since_s is None:
            continue
        if hold and snapshot.node(inst.node_id).kind in hold:
            continue
        fn = snapshot.find_function(inst.function)
        keep_alive_s = fn.keep_alive_s if fn is not None else 0.0
        if snapshot.now_s - inst.idle_since_s >= keep_alive_s:
            due.append((inst.idle_since_s, inst.instance_id, inst))
    return [inst for _, _, inst in sorted(due, key=lambda d: (d[0], d[1]))]
