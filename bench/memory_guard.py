"""Load models into a pod that runs under a real memory limit (a cgroup), and say what happened.

A pod estimates each load before it reads a weight and refuses (507 insufficient_memory) one that
would not fit; without that, a load past the limit gets the pod OOM-killed. This makes a cgroup
with --limit-mb (cgroup v2, else v1; needs root and a writable /sys/fs/cgroup), starts one
`slinfer serve` in it per dtype, asks it to load --model in that dtype, and reports the answer
and whether the pod survived. Prints one line per dtype and, LAST, one JSON object.

Usage: python bench/memory_guard.py [--limit-mb 900] [--dtypes float32,bfloat16,int8]
         [--model 'random:smollm2-shape?seed=0'] [--kv-budget-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TOKEN = "memory-guard"


def make_cgroup(name: str, limit_bytes: int) -> tuple[Path, str]:
    """A fresh cgroup limited to ``limit_bytes``: (its directory, "v2" or "v1")."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # v2 (unified)
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        d = root / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit_bytes))
        if (d / "memory.swap.max").exists():  # no swap: the limit is the limit
            (d / "memory.swap.max").write_text("0")
        return d, "v2"
    d = root / "memory" / name
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return d, "v1"


def oom_kills(d: Path, version: str) -> int:
    f = d / ("memory.events" if version == "v2" else "memory.oom_control")
    for line in f.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def try_load(cgroup: Path, model: str, dtype: str, kv_budget_mb: int) -> dict[str, object]:
    port = free_port()
    procs = cgroup / "cgroup.procs"

    def enter() -> None:  # in the child, before exec: the pod and all it allocates are in the cgroup
        procs.write_text(str(os.getpid()))

    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--no-functions", "--port", str(port),
           "--admin-token", TOKEN, "--kv-budget-mb", str(kv_budget_mb)]
    pod = subprocess.Popen(cmd, cwd=REPO, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if pod.poll() is not None:
                return {"dtype": dtype, "outcome": "pod did not start", "detail": pod.stderr.read().decode()[-500:]}
            time.sleep(0.1)
        memory = httpx.get(f"{base}/admin/status", headers=auth, timeout=10).json().get("memory")
        try:
            r = httpx.post(f"{base}/admin/instances?profile=false", headers=auth, timeout=300,
                           json={"name": "m", "model": model, "dtype": dtype})
            answer: object = r.status_code
            detail = r.json().get("error", {}).get("message", "") if r.status_code != 201 else ""
        except httpx.HTTPError as e:
            answer, detail = f"no answer ({type(e).__name__})", ""
        time.sleep(0.5)
        alive = pod.poll() is None
        return {"dtype": dtype, "answer": answer, "pod": "alive" if alive else f"died (exit {pod.returncode})",
                "detail": detail, "memory_seen": memory}
    finally:
        pod.kill()
        pod.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mb", type=int, default=900)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--model", default="random:smollm2-shape?seed=0")
    ap.add_argument("--kv-budget-mb", type=int, default=64)
    a = ap.parse_args()
    try:
        cgroup, version = make_cgroup(f"slinfer-memory-guard-{os.getpid()}", a.limit_mb << 20)
    except OSError as e:
        sys.exit(f"cannot make a cgroup here ({e}); run as root where /sys/fs/cgroup is writable")
    results = []
    try:
        for dtype in a.dtypes.split(","):
            before = oom_kills(cgroup, version)
            res = try_load(cgroup, a.model, dtype, a.kv_budget_mb)
            res["oom_kills"] = oom_kills(cgroup, version) - before
            results.append(res)
            print(f"{dtype}: answer {res.get('answer', res.get('outcome'))}, pod {res.get('pod', '-')}, "
                  f"OOM kills {res['oom_kills']}{'; ' + str(res['detail'])[:160] if res.get('detail') else ''}",
                  flush=True)
    finally:
        for _ in range(50):  # the killed pods leave the cgroup a moment later
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    print(json.dumps({"limit_mb": a.limit_mb, "cgroup": version, "model": a.model,
                      "results": [{k: v for k, v in r.items() if k != "memory_seen"} for r in results]}))


if __name__ == "__main__":
    main()
