"""Processes as Linux's /proc shows them, for the scripts that say which process spent what (bench, profile_job)."""

from __future__ import annotations

import os
from pathlib import Path

# Fields of /proc/PID/stat after the command name, counted from 0: state, ppid, pgrp, ..., utime, stime.
PPID, PGRP, UTIME, STIME = 1, 2, 11, 12


def process_stats() -> dict[int, list[str]]:
    """Every live process's /proc/PID/stat fields after its command name (which may hold spaces and parentheses)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = text[text.rindex(")") + 2 :].split()
    return stats


def cpu_s(fields: list[str]) -> float:
    """A process's user + system CPU seconds so far."""
    return (int(fields[UTIME]) + int(fields[STIME])) / os.sysconf("SC_CLK_TCK")


def cpu_s_by_part(parts: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each part: its processes and all their descendants (a worker's nodes are its children,
    which /proc counts apart from it)."""
    stats = process_stats()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[PPID]), []).append(pid)
    return {
        name: sum(cpu_s(stats[pid]) for root in roots for pid in _tree(root, children) if pid in stats)
        for name, roots in parts.items()
    }


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def host_cpu_s(cpus: set[int]) -> dict[str, float]:
    """CPU seconds so far of the given CPUs, from /proc/stat: `busy` (user, nice, system, irq, softirq), `idle`
    (idle and iowait) and `stolen` (taken by the hypervisor for other guests: a shared machine's hidden cost)."""
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    totals = {"busy": 0.0, "idle": 0.0, "stolen": 0.0}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
        totals["busy"] += (user + nice + system + irq + softirq) * tick_s
        totals["idle"] += (idle + iowait) * tick_s
        totals["stolen"] += steal * tick_s
    return totals
