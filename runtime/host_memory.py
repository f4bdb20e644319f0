"""How much host memory this pod may still take before the kernel OOM-kills it.

Read from the pod's cgroup (a Kubernetes memory limit: v2 ``memory.max``, v1
``memory.limit_in_bytes``) and from ``/proc/meminfo`` (the host's MemAvailable), keeping the
tighter. Inside a cgroup, usage counts as the kubelet's working set (usage less inactive file
pages, which the kernel drops before it kills). ``--memory-limit-mb`` replaces the limit where
neither tells the truth (a VM shared with other services): usage is then this process's resident
anonymous memory. The pod asks before each load from disk (``runtime.pod``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryReading", "read_memory"]

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class MemoryReading:
    limit_bytes: int | None  # what the pod may use in all; None: no limit found
    available_bytes: int  # what a new allocation may still take
    source: str  # where the tighter figure came from: "cgroup v2", "cgroup v1", "meminfo", "configured"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, _, v in (ln.partition(" ") for ln in lines) if v.isdigit()}


def _meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for ln in lines:
        key, _, rest = ln.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _candidates(mount: Path, rel: str) -> list[Path]:
    """Where this process's cgroup ``rel`` may be under ``mount``: the whole path, then shorter
    tails of it (the mount's root may be an ancestor of our cgroup, as in a container that sees
    part of the host's hierarchy), then the mount itself (a cgroup namespace puts ours there)."""
    parts = [p for p in rel.split("/") if p]
    return [mount.joinpath(*parts[i:]) for i in range(len(parts))] + [mount]


def _own_cgroup_dirs(root: Path) -> list[tuple[str, Path]]:
    """This process's memory cgroup directories, v2 then v1, that exist here."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    out: list[tuple[str, Path]] = []
    for ln in lines:
        _, controllers, rel = ln.split(":", 2) if ln.count(":") >= 2 else ("", "", "")
        if controllers == "":
            out += [("cgroup v2", d) for d in _candidates(root / "sys/fs/cgroup", rel)
                    if (d / "memory.max").exists()][:1]
        elif "memory" in controllers.split(","):
            out += [("cgroup v1", d) for d in _candidates(root / "sys/fs/cgroup/memory", rel)
                    if (d / "memory.limit_in_bytes").exists()][:1]
    return out


def _resident_anon(root: Path) -> int:
    try:
        lines = (root / "proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for ln in lines:
        if ln.startswith("RssAnon:"):
            return int(ln.split()[1]) * 1024
    return 0


def read_memory(limit_bytes: int | None = None, root: Path = Path("/")) -> MemoryReading:
    """The pod's memory now. ``limit_bytes`` (configured) replaces the cgroup's; ``root`` is
    where /proc and /sys are (tests point it at a fake tree)."""
    readings: list[tuple[int, int | None, str]] = []  # (available, limit, source)
    info = _meminfo(root)
    if "MemAvailable" in info:
        readings.append((info["MemAvailable"], info.get("MemTotal"), "meminfo"))
    if limit_bytes is not None:
        readings.append((limit_bytes - _resident_anon(root), limit_bytes, "configured"))
    else:
        for source, d in _own_cgroup_dirs(root):
            if source == "cgroup v2":
                limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                inactive = _stat(d / "memory.stat").get("inactive_file", 0)
            else:
                limit, usage = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
                inactive = _stat(d / "memory.stat").get("total_inactive_file", 0)
            if limit is not None and limit < _UNLIMITED and usage is not None:
                readings.append((limit - max(0, usage - inactive), limit, source))
    if not readings:
        return MemoryReading(None, _UNLIMITED, "unknown")
    available, limit, source = min(readings, key=lambda r: r[0])
    return MemoryReading(limit, max(0, available), source)
