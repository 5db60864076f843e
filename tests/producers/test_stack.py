"""The service stack the demo, the benchmarks and the tests start their processes with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inferq.producers.stack import ServiceStack


def test_a_failed_script_shows_the_end_of_every_service_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = ServiceStack({}, tmp_path)
    try:
        for name in ("api", "worker"):
            line = f"print('{name} says ' + 'x' * 5000 + ' last words of {name}')"
            stack.start_command(name, [sys.executable, "-c", line]).wait(timeout=30)
        stack.print_log_tails(chars=100)
    finally:
        stack.stop()
    shown = capsys.readouterr().err
    for name in ("api", "worker"):
        assert f"--- {name} log (tail)" in shown
        assert f"last words of {name}" in shown
    assert "says" not in shown  # only the tail: the start of each log is 5,000 characters further back
