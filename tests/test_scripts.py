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
    assert re.search(rf"fraud 40 one-row jobs, bulk \(median of 3\)\s+jobs/s{number * 6}", done.stdout), done.stdout


def test_the_low_load_reference_runs_each_image_in_process_when_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The overhead rows subtract it: a reference that answered without running the image would hide the overhead.
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    from inferq.producers.samples import write_samples

    samples = write_samples(tmp_path / "samples")
    with bench.reference_process(1, 3, samples, tmp_path / "reference.log") as reference:
        seconds = [reference.run(index) for index in range(3)]
    # A DenseNet-121 pass on one thread takes tens of milliseconds on any CPU this runs on.
    assert all(0.005 < s < 60 for s in seconds), seconds
