"""The benchmark keeps working: it is how speed is measured, so it must not rot (its figures are not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_both_sides_and_prints_their_ratio() -> None:
    argv = [sys.executable, str(REPO_ROOT / "scripts" / "bench.py"), "--model", "fraud", "--jobs", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"reference \(in-process\):\s+[\d.]+ jobs/s", done.stdout)
    assert re.search(r"ratio inferq/reference:\s+[\d.]+", done.stdout)
