"""The pod's memory, read from a fake /proc and /sys tree: cgroup v2 and v1 limits, the host's
MemAvailable, a configured limit; the tightest wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.host_memory import read_memory

MiB = 1 << 20


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


MEMINFO = f"MemTotal:       {64 * 1024 * 1024} kB\nMemFree: 1 kB\nMemAvailable:   {40 * 1024 * 1024} kB\n"


@pytest.mark.parametrize("files,limit,available,source", [
    # no cgroup limit: the host's MemAvailable (40 GiB of 64)
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n"},
     64 << 30, 40 << 30, "meminfo"),
    # cgroup v2 at the pod's own path: 8 GiB less the working set (3 GiB used, 1 GiB of it inactive files)
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
      "sys/fs/cgroup/kubepods/pod1/c1/memory.max": str(8 << 30),
      "sys/fs/cgroup/kubepods/pod1/c1/memory.current": str(3 << 30),
      "sys/fs/cgroup/kubepods/pod1/c1/memory.stat": f"anon {2 << 30}\ninactive_file {1 << 30}\n"},
     8 << 30, 6 << 30, "cgroup v2"),
    # cgroup v2 namespaced: the container sees its cgroup at the mount's root
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": str(4 << 30),
      "sys/fs/cgroup/memory.current": str(1 << 30), "sys/fs/cgroup/memory.stat": "inactive_file 0\n"},
     4 << 30, 3 << 30, "cgroup v2"),
    # cgroup v1 with a limit
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/docker/abc\n3:cpu:/docker/abc\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 << 30),
      "sys/fs/cgroup/memory/memory.usage_in_bytes": str(1536 * MiB),
      "sys/fs/cgroup/memory/memory.stat": f"cache 1\ntotal_inactive_file {512 * MiB}\n"},
     2 << 30, 1 << 30, "cgroup v1"),
    # cgroup v1 where the mount's root is an ancestor of ours (part of the host's hierarchy)
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/runner/abc/pod7\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
      "sys/fs/cgroup/memory/pod7/memory.limit_in_bytes": str(1 << 30),
      "sys/fs/cgroup/memory/pod7/memory.usage_in_bytes": str(256 * MiB)},
     1 << 30, 768 * MiB, "cgroup v1"),
    # cgroup v1 without a limit (a huge number): the host's
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": str(1 << 30)},
     64 << 30, 40 << 30, "meminfo"),
    # a cgroup limit above what the host has free: the host's figure is the tighter
    ({"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": str(100 << 30),
      "sys/fs/cgroup/memory.current": str(1 << 30)},
     64 << 30, 40 << 30, "meminfo"),
    # nothing readable (not Linux): no limit known, nothing refused
    ({}, None, 1 << 60, "unknown"),
])
def test_the_tightest_reading_wins(tmp_path, files, limit, available, source):
    got = read_memory(root=tree(tmp_path, files))
    assert (got.limit_bytes, got.available_bytes, got.source) == (limit, available, source)


def test_a_configured_limit_counts_this_process_resident_memory(tmp_path):
    root = tree(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/status": f"Name: x\nRssAnon:\t{512 * 1024} kB\n",
                           "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": str(1 << 30),
                           "sys/fs/cgroup/memory.current": "0"})
    got = read_memory(3 << 30, root=root)  # replaces the cgroup's 1 GiB
    assert (got.limit_bytes, got.available_bytes, got.source) == (3 << 30, (3 << 30) - 512 * MiB, "configured")


def test_this_machine_reads_something_sane():
    got = read_memory()
    assert got.available_bytes > 0 and got.source in ("meminfo", "cgroup v1", "cgroup v2")
