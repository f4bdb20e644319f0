"""Admin API of a runtime pod (not public): load, unload, evict, status. Bearer-token auth;
the autoscaler is its only intended caller."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from functions import SpecError, parse_function_spec
from runtime.pod import Pod, PodError


def admin_router(pod: Pod, token: str) -> APIRouter:
    def auth(authorization: str | None = Header(default=None)) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given, token):
            raise HTTPException(status_code=401, detail="admin API: missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    r = APIRouter(prefix="/admin", dependencies=[Depends(auth)])

    @r.get("/status")
    async def status() -> dict[str, Any]:
        return await pod.status()

    @r.post("/instances", status_code=201)
    async def load(request: Request, profile: bool = True) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError as e:
            raise PodError(400, "request body is not valid JSON", "invalid_json") from e
        if not isinstance(body, dict):
            raise PodError(400, "the body must be a FunctionSpec object", "invalid_spec")
        try:
            spec = parse_function_spec(body)
        except SpecError as e:
            raise PodError(400, str(e), "invalid_spec") from e
        s = await pod.load(spec, profile=profile)
        return JSONResponse({"name": s.name, "state": s.state.value, "load_s": round(s.load_s, 3),
                             "weights_cached": s.weights_cached}, status_code=201)

    @r.delete("/instances/{name}")
    async def unload(name: str, drain: bool = True) -> dict[str, Any]:
        return await pod.unload(name, drain=drain)

    @r.post("/instances/{name}/evict")
    async def evict(name: str) -> dict[str, Any]:
        return await pod.evict(name)

    @r.post("/hand-off")
    async def hand_off(drain_s: float | None = None) -> dict[str, Any]:
        """The pod is about to go (a Kubernetes preStop hook; SIGTERM does the same): no more
        work; running requests finish within ``drain_s`` or leave with continuations."""
        if drain_s is not None and not 0 <= drain_s <= 3600:
            raise PodError(400, f"drain_s must be in [0, 3600], got {drain_s}", "invalid_value")
        return {"handed_off": await pod.hand_off(drain_s), "terminating": True}

    return r
