"""Failure, tested: real processes hurt with real signals, counting what was lost or run twice (target: none)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.chaos.harness import SCENARIOS, ChaosStack, Tally

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    with ChaosStack(tmp_path_factory.mktemp("chaos")) as stack:
        yield stack


def _run(chaos: ChaosStack, name: str) -> Tally:
    tally = SCENARIOS[name](chaos)
    print(tally.row())
    assert tally.lost == 0, tally.row()
    assert tally.run_twice == 0, tally.row()
    return tally


def test_sigkill_of_a_whole_worker_loses_nothing(chaos: ChaosStack) -> None:
    tally = _run(chaos, "kill_whole_worker")
    assert tally.succeeded == tally.submitted
    assert tally.retried > 0  # the killed worker held jobs, and they ran again elsewhere


def test_sigkill_of_one_worker_process_loses_nothing(chaos: ChaosStack) -> None:
    tally = _run(chaos, "kill_one_process")
    assert tally.succeeded == tally.submitted


def test_a_redis_restart_loses_nothing(chaos: ChaosStack) -> None:
    tally = _run(chaos, "restart_redis")
    assert tally.succeeded == tally.submitted


def test_sigterm_finishes_or_hands_back_every_job(chaos: ChaosStack) -> None:
    tally = _run(chaos, "terminate_worker")
    assert tally.succeeded == tally.submitted


def test_jobs_past_their_time_limit_fail_with_timeout_and_others_flow(chaos: ChaosStack) -> None:
    tally = _run(chaos, "hard_time_limit")
    assert tally.failed == {"timeout": 8}
    assert tally.succeeded == 10


def test_an_input_that_kills_its_worker_is_dead_lettered_and_others_flow(chaos: ChaosStack) -> None:
    tally = _run(chaos, "poison_input")
    assert tally.failed == {"poison": 1}, [{k: v for k, v in f.items() if k != "error"} for f in tally.failures]
    assert tally.succeeded == tally.submitted - 1
    # The operator lists the dead letters (no patient data shown) and requeues one; it then runs normally
    [poison] = chaos.stores.jobs.dead_letters()
    listed = [json.loads(line) for line in _inferq(chaos, "dead-letter", "list").stdout.splitlines()]
    assert [row["job_id"] for row in listed] == [poison] and listed[0]["error_code"] == "poison"
    assert "SYNTHETIC" not in json.dumps(listed) and "DEMO-0001" not in json.dumps(listed)
    requeued = _inferq(chaos, "dead-letter", "requeue", poison)
    assert json.loads(requeued.stdout) == {"job_id": poison, "requeue": "ok"}
    name = chaos.start_worker()
    [job] = chaos.wait_final([poison], timeout_s=120)
    chaos.stop_worker(name)
    assert job is not None and job["status"] == "succeeded" and chaos.stores.jobs.dead_letters() == []


def _inferq(chaos: ChaosStack, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "inferq.producers.cli", *args]
    done = subprocess.run(argv, env=chaos.env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_callbacks_arrive_signed_after_the_receiver_recovers(chaos: ChaosStack) -> None:
    tally = _run(chaos, "callback_receiver_down")
    assert tally.succeeded == tally.submitted


def test_a_lost_message_is_published_again_by_the_reconciler(chaos: ChaosStack) -> None:
    tally = _run(chaos, "lost_message")
    assert tally.succeeded == tally.submitted
