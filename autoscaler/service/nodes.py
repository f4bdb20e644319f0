"""Runtime pods as the autoscaler knows them: where they answer and what they declare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from autoscaler.core import DeviceKind, NodeId


@dataclass(frozen=True)
class NodeSpec:
    node_id: NodeId
    url: str  # base URL of the pod's HTTP server (OpenAI API + /admin)
    kind: DeviceKind
    memory_bytes: int  # declared memory for weights + KV


class NodeSource(Protocol):
    """Who knows which pods exist: the local driver, a fixed list, or (later) Kubernetes."""

    def nodes(self) -> list[NodeSpec]: ...


@dataclass(frozen=True)
class StaticNodes:
    specs: tuple[NodeSpec, ...]

    def nodes(self) -> list[NodeSpec]:
        return list(self.specs)
