"""`slinfer up | deploy | delete | list | invoke | logs`: the embedded mesh and the commands that
talk to it. ``up`` writes ``<state dir>/up.json`` (URLs and the control token, mode 0600); the
other commands read it, so they work from any shell on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from platformdirs import user_state_dir

import functions as functions_pkg
from autoscaler.core import DeviceKind
from functions import SpecError, load_function_dir, load_function_spec
from functions.http import MAX_REQUEST_BYTES, READ_TIMEOUT_S

EXAMPLES_DIR = Path(functions_pkg.__file__).resolve().parent / "examples"
COMMANDS = ("up", "deploy", "delete", "list", "invoke", "logs")


def default_state_dir() -> Path:
    return Path(os.environ.get("SLINFER_STATE_DIR") or user_state_dir("slinfer"))


def _state_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="where `up` keeps logs, deployed functions and up.json (default: $SLINFER_STATE_DIR "
                         "or the user state folder)")


def _fail(message: str) -> None:
    print(f"slinfer: {message}", file=sys.stderr)
    sys.exit(1)


# -- up --------------------------------------------------------------------------------------
def up(argv: list[str]) -> None:
    from activator.app import ActivatorSettings
    from autoscaler.service.controller import ControllerSettings
    from autoscaler.service.local import PodResources
    from autoscaler.service.mesh import Mesh, MeshSettings, new_event_loop

    ap = argparse.ArgumentParser(prog="slinfer up", description="Run the embedded mesh: the activator, "
                                 "the autoscaler and N runtime pods on this machine.")
    ap.add_argument("--functions-dir", type=Path, default=EXAMPLES_DIR, help="FunctionSpec YAML folder "
                    "(default: the bundled examples)")
    ap.add_argument("--pods", type=int, default=2, help="runtime pods (default 2)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="the activator's port (the one clients call)")
    ap.add_argument("--autoscaler-port", type=int, default=8081)
    ap.add_argument("--device", choices=[k.value for k in DeviceKind], default="cpu")
    ap.add_argument("--kv-budget-mb", type=int, default=512, help="KV budget per pod (MiB)")
    ap.add_argument("--weight-cache-mb", type=int, default=2048, help="host weight cache per pod (MiB)")
    ap.add_argument("--pod-memory-mb", type=int, default=4096, help="memory each pod declares for weights + KV")
    ap.add_argument("--pod-memory-limit-mb", type=int, default=None,
                    help="memory each pod may use in all (MiB): loads that would not fit are refused "
                         "(default: the pod's cgroup limit and the host's free memory)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per pod (default: cores / pods)")
    ap.add_argument("--no-profile", action="store_true", help="skip latency profiling on first load")
    ap.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_BYTES / (1 << 20),
                    help="largest request body the activator and pods accept, MiB (413 above it; 0: no limit)")
    ap.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                    help="longest a request's headers, or the next part of its body, may take to reach the "
                         "activator or a pod (408 past it; 0: no limit)")
    ap.add_argument("--shutdown-drain-s", type=float, default=None,
                    help="a pod sent SIGTERM lets running requests finish this long, then hands the rest off "
                         "(default: the pod's, 10 s)")
    ap.add_argument("--log-level", default="info")
    _state_arg(ap)
    a = ap.parse_args(argv)
    try:
        specs = tuple(load_function_dir(a.functions_dir))
    except (SpecError, OSError) as e:
        ap.error(str(e))
    if a.pods < 1:
        ap.error("--pods must be >= 1")
    state = a.state_dir or default_state_dir()
    # A fresh mesh each `up`: functions deployed in an earlier session are not carried over.
    shutil.rmtree(state / "functions", ignore_errors=True)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.pods)
    if not a.max_request_mb >= 0:
        ap.error(f"--max-request-mb must be >= 0, got {a.max_request_mb}")
    if not a.read_timeout_s >= 0:
        ap.error(f"--read-timeout-s must be >= 0, got {a.read_timeout_s}")
    if a.shutdown_drain_s is not None and not a.shutdown_drain_s >= 0:
        ap.error(f"--shutdown-drain-s must be >= 0, got {a.shutdown_drain_s}")
    if a.pod_memory_limit_mb is not None and a.pod_memory_limit_mb <= 0:
        ap.error(f"--pod-memory-limit-mb must be > 0, got {a.pod_memory_limit_mb}")
    resources = PodResources(DeviceKind(a.device), a.kv_budget_mb, a.weight_cache_mb, a.pod_memory_mb, threads,
                             max_request_mb=a.max_request_mb, shutdown_drain_s=a.shutdown_drain_s,
                             read_timeout_s=a.read_timeout_s, memory_limit_mb=a.pod_memory_limit_mb)
    settings = MeshSettings(specs, token, a.pods, a.host, a.port, a.autoscaler_port, resources, state,
                            ControllerSettings(token, profile=not a.no_profile),
                            ActivatorSettings(max_request_bytes=int(a.max_request_mb * (1 << 20)),
                                              read_timeout_s=a.read_timeout_s))
    logging.getLogger().addHandler(logging.FileHandler(state / "logs" / "mesh.log"))
    logging.getLogger().setLevel(a.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    mesh = Mesh(settings)
    info = {"activator": mesh.url, "autoscaler": mesh.autoscaler_url, "token": token, "pid": os.getpid(),
            "pods": [n.url for n in mesh.pods.nodes()]}

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await mesh.start()
        up_json = state / "up.json"
        up_json.write_text(json.dumps(info))
        up_json.chmod(0o600)
        _print_welcome(mesh.url, [s.name for s in specs], state)
        try:
            await stop.wait()
        finally:
            print("[slinfer] shutting down: activator, autoscaler, pods", file=sys.stderr, flush=True)
            up_json.unlink(missing_ok=True)
            await mesh.stop()

    try:
        loop = new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    finally:
        mesh.pods.stop()  # reaps children even if start-up failed half-way


def _print_welcome(url: str, names: list[str], state: Path) -> None:
    first = "chat" if "chat" in names else (names[0] if names else "<function>")
    print(f"""[slinfer] up. Functions: {', '.join(names) or 'none'} (loaded on first request).
[slinfer] OpenAI API at {url}/v1 with model = function name:
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{first}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='unused'); \\
print(c.chat.completions.create(model='{first}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"
[slinfer] also: slinfer list | invoke {first} "Hi" | deploy FILE | delete NAME | logs   (state: {state})
[slinfer] Ctrl-C stops everything.""", file=sys.stderr, flush=True)


# -- the commands that talk to a running mesh -------------------------------------------------
def _mesh(state_dir: Path | None) -> dict[str, Any]:
    path = (state_dir or default_state_dir()) / "up.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        _fail(f"no running mesh found ({path} is missing); start one with `slinfer up`")
    return info


def _control(info: dict[str, Any], method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        return httpx.request(method, info["autoscaler"] + path, headers={"Authorization": f"Bearer {info['token']}"},
                             timeout=30, **kw)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the autoscaler at {info['autoscaler']}: {e}")
        raise


def deploy(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="slinfer deploy", description="Deploy (or update) a function from YAML.")
    ap.add_argument("file", type=Path)
    _state_arg(ap)
    a = ap.parse_args(argv)
    try:
        spec = load_function_spec(a.file)
    except (SpecError, OSError) as e:
        _fail(str(e))
    r = _control(_mesh(a.state_dir), "POST", "/functions", json=spec.to_dict())
    if r.status_code != 201:
        _fail(r.json().get("error", {}).get("message", r.text))
    print(f"deployed {spec.name} ({spec.model}); call it with model = {spec.name!r}")


def delete(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="slinfer delete", description="Undeploy a function.")
    ap.add_argument("name")
    _state_arg(ap)
    a = ap.parse_args(argv)
    r = _control(_mesh(a.state_dir), "DELETE", f"/functions/{a.name}")
    if r.status_code != 200:
        _fail(r.json().get("error", {}).get("message", r.text))
    print(f"deleted {a.name}; its instances unload when idle")


def list_(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="slinfer list", description="Functions, their instances, where, state.")
    ap.add_argument("--json", action="store_true")
    _state_arg(ap)
    a = ap.parse_args(argv)
    st = _control(_mesh(a.state_dir), "GET", "/status").json()
    if a.json:
        print(json.dumps(st, indent=2))
        return
    where: dict[str, list[str]] = {}
    for node in st["nodes"]:
        for i in node["instances"]:
            idle = f", idle {i['idle_s']}s" if i.get("idle_s") is not None else ""
            where.setdefault(i["function"], []).append(f"{node['node']} {i['state']} (batch {i['batch']}{idle})")
    print(f"{'FUNCTION':<20} {'MODEL':<36} {'KEEP-ALIVE':>10}  INSTANCES")
    for f in st["functions"]:
        why = st.get("load_errors", {}).get(f["name"])
        insts = "; ".join(where.get(f["name"], [])) or (f"none: cannot load ({why})" if why else "none (scaled to zero)")
        print(f"{f['name']:<20} {f['model']:<36} {f['keep_alive_s']:>9g}s  {insts}")
    print("\nPODS")
    for node in st["nodes"]:
        print(f"  {node['node']:<8} {node['url']:<28} {node['kind']:<4} {'up' if node['up'] else 'DOWN'}")


def invoke(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="slinfer invoke", description="Call a function with a prompt; streams the answer.")
    ap.add_argument("name")
    ap.add_argument("prompt")
    ap.add_argument("--max-tokens", type=int, default=None)
    _state_arg(ap)
    a = ap.parse_args(argv)
    info = _mesh(a.state_dir)
    body: dict[str, Any] = {"model": a.name, "messages": [{"role": "user", "content": a.prompt}], "stream": True}
    if a.max_tokens:
        body["max_tokens"] = a.max_tokens
    try:
        with httpx.stream("POST", info["activator"] + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                _fail(r.json().get("error", {}).get("message", r.text))
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    _fail(chunk["error"]["message"])
                for c in chunk.get("choices", []):
                    sys.stdout.write(c.get("delta", {}).get("content") or "")
                    sys.stdout.flush()
    except httpx.HTTPError as e:
        _fail(f"cannot reach the activator at {info['activator']}: {e}")
    print()


def logs(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="slinfer logs", description="Show the mesh's logs (mesh and pods).")
    ap.add_argument("source", nargs="?", default=None, help="mesh, pod-0, pod-1, ... (default: all)")
    ap.add_argument("-n", "--lines", type=int, default=40)
    ap.add_argument("-f", "--follow", action="store_true")
    _state_arg(ap)
    a = ap.parse_args(argv)
    folder = (a.state_dir or default_state_dir()) / "logs"
    files = sorted(folder.glob("*.log"))
    if a.source:
        files = [f for f in files if f.stem == a.source]
    if not files:
        _fail(f"no logs{' for ' + a.source if a.source else ''} in {folder}")
    for f in files:
        lines = f.read_text(errors="replace").splitlines()[-a.lines:]
        print(f"==> {f.stem} <==")
        print("\n".join(lines))
    if a.follow:
        pos = {f: f.stat().st_size for f in files}
        try:
            while True:
                for f in files:
                    size = f.stat().st_size
                    if size > pos[f]:
                        with f.open("rb") as fh:
                            fh.seek(pos[f])
                            for line in fh.read().decode(errors="replace").splitlines():
                                print(f"[{f.stem}] {line}")
                        pos[f] = size
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


HANDLERS: dict[str, Callable[[list[str]], None]] = {
    "up": up, "deploy": deploy, "delete": delete, "list": list_, "invoke": invoke, "logs": logs,
}


def run_command(cmd: str, argv: list[str]) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    HANDLERS[cmd](argv)


__all__ = ["COMMANDS", "run_command"]
