"""Warnings raised inside `third_party_boundary` stay quiet in that thread only, under concurrency, without
`warnings.catch_warnings` (which swaps the process-wide filter list and is not thread-safe).

Run in a fresh interpreter: pytest records warnings itself, which would hide what a service prints."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import logging, threading, warnings
from inferq.protocol.media import third_party_boundary

warnings.simplefilter("always")
start = threading.Barrier(16)

def quoting(value):
    warnings.warn(f"Invalid value for VR PN: {value!r}", UserWarning)

def inside(n):
    start.wait()
    for i in range(300):
        with third_party_boundary("DICOM header"):
            quoting(f"DOE^PATIENT{n}-{i}")

def outside(n):
    start.wait()
    for i in range(300):
        quoting(f"harmless-{n}-{i}")

threads = [threading.Thread(target=inside if n % 2 else outside, args=(n,)) for n in range(16)]
for t in threads: t.start()
for t in threads: t.join()

# Celery routes warnings to logging; those are filtered the same way.
logging.basicConfig(level=logging.WARNING)
logging.captureWarnings(True)
with third_party_boundary("DICOM header"):
    quoting("DOE^LOGGED")
quoting("harmless-logged")
"""


def test_concurrent_boundaries_keep_header_values_out_of_stderr_and_logs() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DOE" not in done.stderr
    # Warnings outside a boundary are untouched, printed and logged as before.
    assert done.stderr.count("harmless-") >= 8 * 300 and "py.warnings" in done.stderr
