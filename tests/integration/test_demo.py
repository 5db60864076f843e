"""The README's demo command, as a newcomer runs it: no Redis configured, so the demo starts its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inferq.producers.samples import SAMPLE_NAMES

pytestmark = pytest.mark.slow


def test_the_demo_starts_its_own_redis_serves_the_samples_and_stops(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {"INFERQ_DATA_DIR": str(tmp_path / "data"), "INFERQ_API_PORT": "0", "INFERQ_FLOWER_PORT": "0"}
    argv = [sys.executable, "-m", "inferq.producers.cli", "demo", "--exit-after-samples"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "started a private Redis" in out
    # Persistence on: the private Redis keeps an append-only file in the data directory.
    assert any("appendonly" in p.name for p in (tmp_path / "data" / "redis").iterdir())
    for name in SAMPLE_NAMES:
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert "succeeded" in row
    assert "fraud: 3 transactions" in out and "UNTRAINED" in out
    assert "/docs" in out and "Flower:" in out
    # A key was made for the demo, printed once, and stored only as a hash; Flower has a generated login.
    assert re.search(r"^  iq_[0-9a-f]{16}_\S{43}$", out, re.MULTILINE)
    assert re.search(r"Flower: .*\(user demo, password \S+\)", out)
