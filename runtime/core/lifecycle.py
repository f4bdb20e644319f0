"""Instance lifecycle: one enum, one transition table.

    LOADING --loaded--> READY --drain--> DRAINING --drained--> UNLOADED
       |                  |                  |
       +--failed--> FAILED +--evict--> EVICTED <--evict--+
"""

from __future__ import annotations

import enum


class InstanceState(enum.Enum):
    LOADING = "loading"  # weights loading / profiling; not admitting yet
    READY = "ready"  # admitting requests
    DRAINING = "draining"  # unload requested: running requests finish, no new ones
    UNLOADED = "unloaded"  # gone, gracefully
    EVICTED = "evicted"  # gone at once; its requests ended with continuations
    FAILED = "failed"  # load failed


class InstanceEvent(enum.Enum):
    LOADED = "loaded"
    FAILED = "failed"
    DRAIN = "drain"
    DRAINED = "drained"
    EVICT = "evict"


TRANSITIONS: dict[tuple[InstanceState, InstanceEvent], InstanceState] = {
    (InstanceState.LOADING, InstanceEvent.LOADED): InstanceState.READY,
    (InstanceState.LOADING, InstanceEvent.FAILED): InstanceState.FAILED,
    (InstanceState.READY, InstanceEvent.DRAIN): InstanceState.DRAINING,
    (InstanceState.READY, InstanceEvent.EVICT): InstanceState.EVICTED,
    (InstanceState.DRAINING, InstanceEvent.DRAINED): InstanceState.UNLOADED,
    (InstanceState.DRAINING, InstanceEvent.EVICT): InstanceState.EVICTED,
}

TERMINAL = frozenset({InstanceState.UNLOADED, InstanceState.EVICTED, InstanceState.FAILED})


class InvalidTransition(ValueError):
    pass


def transition(state: InstanceState, event: InstanceEvent) -> InstanceState:
    nxt = TRANSITIONS.get((state, event))
    if nxt is None:
        raise InvalidTransition(f"instance in state {state.value} cannot take event {event.value}")
    return nxt
