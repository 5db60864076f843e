"""The default worker layout follows the CPUs this process may use: affinity and cgroup quota, not the host's count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferq.workers.layout import cgroup_cpu_quota, usable_cpus
from tests.conftest import REPO_ROOT


def test_a_cgroup_v2_quota_caps_the_usable_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to restrict the affinity to one")
def test_inferq_worker_starts_one_process_per_cpu_of_its_affinity() -> None:
    # Given a process allowed on one CPU only, `inferq worker` plans one worker process (it prints its layout).
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from workers.layout import default_processes; print(default_processes(threads_per_process=1))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    full = subprocess.run(
        [
            sys.executable,
            "-c",
            "from workers.layout import default_processes; print(default_processes(threads_per_process=1))",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(full.stdout) == usable_cpus() >= 2
