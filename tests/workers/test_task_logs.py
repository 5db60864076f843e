"""What a worker's log says of the outcomes it recorded: every job's id with its status, one line per job or one per
bulk chunk, in the form the chaos harness reads back to count jobs run twice."""

from __future__ import annotations

import logging

import pytest

from inferq.protocol.jobs import Claim, JobStatus, new_job_id
from inferq.workers.tasks import _log_recorded
from tests.chaos.harness import _recorded_ids


def _attempt(status: JobStatus, batch_jobs: int) -> tuple[str, Claim, JobStatus, dict[str, object], int]:
    return new_job_id(), Claim("claimed", token=1), status, {}, batch_jobs


def test_a_lone_job_gets_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    attempt = _attempt(JobStatus.SUCCEEDED, 1)
    with caplog.at_level(logging.INFO, logger="inferq.workers.tasks"):
        _log_recorded([attempt], {"succeeded": [attempt[0]]})
    [line] = caplog.messages
    assert line == f"job {attempt[0]} recorded succeeded (attempt 1, batch of 1)"
    assert _recorded_ids(line) == [attempt[0]]


def test_a_chunk_gets_one_line_naming_every_job_with_its_status(caplog: pytest.LogCaptureFixture) -> None:
    ok = [_attempt(JobStatus.SUCCEEDED, 64) for _ in range(3)]
    bad = _attempt(JobStatus.FAILED, 0)
    with caplog.at_level(logging.INFO, logger="inferq.workers.tasks"):
        _log_recorded([*ok, bad], {"succeeded": [a[0] for a in ok], "failed": [bad[0]]})
    [line] = caplog.messages
    assert line.startswith("chunk of 4 jobs recorded (batches of [0, 64]): succeeded: ")
    assert f"failed: {bad[0]}" in line
    assert sorted(_recorded_ids(line)) == sorted(a[0] for a in [*ok, bad])


def test_nothing_recorded_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inferq.workers.tasks"):
        _log_recorded([_attempt(JobStatus.SUCCEEDED, 2), _attempt(JobStatus.SUCCEEDED, 2)], {})
    assert caplog.messages == []
