"""Replacing the instances of a redeployed function. Pure: pod answers and specs in, decisions out.

A redeploy that changes what an instance serves (``FunctionSpec.instance_digest``: the model, its
dtype, the SLO, limits, system prompt or output schema) leaves the pods running instances of the
old spec: "stale" ones; so does one whose ``device`` no longer allows the node an instance is on
(it moves). They are replaced one at a time per function:
  - an idle stale instance (nothing running, nothing served for ``quiet_s``) is unloaded at once
    (nobody waits on it; the next request loads the new spec, as after a scale to zero);
  - a busy one keeps serving until an instance of the new spec is ready (``routes`` then lists only
    those), and is drained then: make before break. Until one is, the function asks for one
    (``want``), and ``decide`` places it on another node like any scale-out;
  - where ``decide`` cannot place it (no other node has room, or the function is at
    ``max_instances``), the stale instance is drained first and the new one is loaded after it,
    on the requests that wait meanwhile (``fallback``): break before make.
An instance that is draining or being unloaded holds its function's rollout until it is gone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from autoscaler.core import InstanceId, Load, NodeId, Plan, Unload
from autoscaler.service.observe import PodStatus, instance_id
from functions import DevicePreference, FunctionSpec


@dataclass(frozen=True)
class Rollout:
    unload: tuple[Unload, ...] = ()  # stale instances to drain now
    want: tuple[str, ...] = ()  # functions that need an instance of their new spec placed
    # per wanted function, the stale instance to drain if the plan places none (break before make)
    fallback: tuple[Unload, ...] = ()

    def fallbacks(self, plan: Plan) -> list[Unload]:
        """The fallback unloads for the wanted functions ``plan`` loads nowhere."""
        placed = {a.function for a in plan.actions if isinstance(a, Load)}
        return [u for u in self.fallback if u.instance_id.split("@", 1)[0] not in placed]


QUIET_S = 2.0  # a stale instance this long without work is idle (requests in a steady stream are closer)


class _Ready(NamedTuple):
    node: NodeId
    stale: bool  # loaded from an older spec, or on a device the function no longer allows
    quiet: bool  # no work for quiet_s


def rollout(pods: Sequence[PodStatus], functions: Mapping[str, FunctionSpec],
            loading: Collection[tuple[str, NodeId]], removing: Collection[InstanceId],
            idle_s: Mapping[InstanceId, float], quiet_s: float = QUIET_S) -> Rollout:
    """This round's step of every redeployed function's replacement (see the module doc).
    ``loading``: loads sent and not yet seen; ``removing``: unloads and evicts under way;
    ``idle_s``: how long each idle instance has had no work (absent: busy lately)."""
    ready: dict[str, list[_Ready]] = {}
    going: set[str] = {fn for fn, _ in loading}  # a new instance is on its way
    for p in sorted(pods, key=lambda p: p.node.node_id):
        for i in p.instances:
            if i.function not in functions:
                continue
            iid = instance_id(i.function, p.node.node_id)
            if i.state != "ready" or iid in removing:
                going.add(i.function)  # loading, or on its way out: one step at a time
                continue
            pref = functions[i.function].device
            misplaced = pref is not DevicePreference.ANY and pref.value != p.node.kind.value
            quiet = not i.busy and idle_s.get(iid, 0.0) >= quiet_s
            ready.setdefault(i.function, []).append(_Ready(p.node.node_id, i.stale(functions) or misplaced, quiet))
    unload: list[Unload] = []
    want: list[str] = []
    fallback: list[Unload] = []
    for fn, insts in sorted(ready.items()):
        stale = [r for r in insts if r.stale]
        if not stale or fn in going:
            continue
        idle = [r for r in stale if r.quiet]
        if idle:
            unload.append(Unload(instance_id(fn, idle[0].node), idle[0].node, drain=True))
        elif any(not r.stale for r in insts):  # the new spec serves: retire one
            unload.append(Unload(instance_id(fn, stale[0].node), stale[0].node, drain=True))
        else:
            want.append(fn)
            fallback.append(Unload(instance_id(fn, stale[0].node), stale[0].node, drain=True))
    return Rollout(tuple(unload), tuple(want), tuple(fallback))
