"""What the autoscaler decides, as values. An adapter executes them against the runtime's admin API
(load, unload, evict); the simulator applies them to its virtual pods. Within one ``Plan`` the
order matters: an ``Evict`` comes before the ``Load`` it makes room for (the runtime commits a load
only against memory that has actually been freed, so the two may be sent together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from autoscaler.core.snapshot import FunctionId, InstanceId, NodeId, Resource

__all__ = ["Action", "Evict", "Load", "Plan", "Unload"]


@dataclass(frozen=True)
class Load:
    """Load a new instance of ``function`` on ``node_id``."""

    function: FunctionId
    node_id: NodeId


@dataclass(frozen=True)
class Unload:
    """Unload an instance; with ``drain`` its running requests finish first (no new ones join)."""

    instance_id: InstanceId
    node_id: NodeId
    drain: bool


@dataclass(frozen=True)
class Evict:
    """Remove an instance at once to free ``reason``; its requests end with continuations that the
    activator re-submits elsewhere (prompt + tokens so far)."""

    instance_id: InstanceId
    node_id: NodeId
    reason: Resource


Action: TypeAlias = Load | Unload | Evict


@dataclass(frozen=True)
class Plan:
    """One round's actions, in the order to apply them, and the functions whose waiting demand
    found no room (their requests keep waiting; the next round tries again)."""

    actions: tuple[Action, ...] = ()
    waiting: tuple[FunctionId, ...] = ()

    @property
    def loads(self) -> list[Load]:
        return [a for a in self.actions if isinstance(a, Load)]

    @property
    def unloads(self) -> list[Unload]:
        return [a for a in self.actions if isinstance(a, Unload)]

    @property
    def evictions(self) -> list[Evict]:
        return [a for a in self.actions if isinstance(a, Evict)]
