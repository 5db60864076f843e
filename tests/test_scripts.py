"""The benchmark keeps working: it is how speed is measured, so it must not rot (its figures are not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_limit_naive_and_inferq_and_prints_their_ratios() -> None:
    argv = [sys.executable, str(REPO_ROOT / "scripts" / "bench.py"), "--quick", "--only", "fraud"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"best: \d+ process\(es\) x \d+ thread\(s\), batch \d+: [\d.]+", done.stdout)
    assert re.search(r"inferq/limit\s+inferq/naive", done.stdout)
    number = r"\s+[\d.]+"
    assert re.search(rf"fraud 40 one-row jobs, bulk\s+jobs/s{number * 6}", done.stdout), done.stdout
