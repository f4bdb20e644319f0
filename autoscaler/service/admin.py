"""The runtime pods' admin API, as the autoscaler calls it (bearer token, JSON)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from autoscaler.service.nodes import NodeSpec
from functions import FunctionSpec


class AdminError(Exception):
    def __init__(self, node: NodeSpec, status: int, message: str) -> None:
        super().__init__(f"{node.node_id}: {status} {message}")
        self.status = status
        self.fields = _error_object(message)  # the OpenAI-shaped error object; {} when there is none
        detail, code = self.fields.get("message"), self.fields.get("code")
        self.detail = detail if isinstance(detail, str) else message  # the pod's own words, for users
        self.code = code if isinstance(code, str) else None  # e.g. "already_loaded"


def _error_object(text: str) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body, else {}."""
    try:
        value = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


class AdminClient:
    def __init__(self, client: httpx.AsyncClient, token: str, status_timeout_s: float = 2.0,
                 load_timeout_s: float = 300.0, profile: bool = True) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.status_timeout_s = status_timeout_s
        self.load_timeout_s = load_timeout_s
        self.profile = profile

    async def _call(self, node: NodeSpec, method: str, path: str, timeout_s: float, **kw: Any) -> dict[str, Any]:
        r = await self.client.request(method, node.url + path, headers=self.headers, timeout=timeout_s, **kw)
        if r.status_code >= 400:
            raise AdminError(node, r.status_code, r.text[:2000])
        body: dict[str, Any] = r.json()
        return body

    async def status(self, node: NodeSpec) -> dict[str, Any]:
        return await self._call(node, "GET", "/admin/status", self.status_timeout_s)

    async def healthy(self, node: NodeSpec) -> bool:
        """Whether the pod says it is healthy (/healthz never waits for the device thread, so a pod
        busy loading says so at once; a frozen one does not answer, and one whose device thread
        has died or stalled says it is not)."""
        try:
            r = await self.client.get(node.url + "/healthz", timeout=self.status_timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 or "terminating" in r.text  # (shutting down: the status says so)

    async def load(self, node: NodeSpec, spec: FunctionSpec) -> dict[str, Any]:
        return await self._call(node, "POST", "/admin/instances", self.load_timeout_s, json=spec.to_dict(),
                                params={"profile": str(self.profile).lower()})

    async def unload(self, node: NodeSpec, name: str, drain: bool) -> dict[str, Any]:
        return await self._call(node, "DELETE", f"/admin/instances/{name}", self.load_timeout_s,
                                params={"drain": str(drain).lower()})

    async def evict(self, node: NodeSpec, name: str) -> dict[str, Any]:
        return await self._call(node, "POST", f"/admin/instances/{name}/evict", self.load_timeout_s)
