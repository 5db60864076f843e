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
