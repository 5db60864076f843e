"""How many worker processes a host should run: one single-threaded process per CPU this process may use.

`os.cpu_count()` counts the host's CPUs; a container limited to 2 CPUs on a 64-core host must not start 64
processes. The usable count is the CPU affinity mask, further capped by a cgroup CPU quota (v2 `cpu.max`, or v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup quota where one is set."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(affinity, math.ceil(quota)) if quota is not None else affinity)


def cgroup_cpu_quota(cgroup_root: Path = _CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs, or None where there is none (or it cannot be read)."""
    v2 = cgroup_root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup_root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def default_processes(*, threads_per_process: int) -> int:
    """As many processes as usable CPUs allow at `threads_per_process` torch threads each."""
    return max(1, usable_cpus() // max(1, threads_per_process))
