"""Idle cores lent between the CPU nodes of one `inferq worker`: borrowed only from a node that holds no job, given
back before that node computes, and never kept by a borrower that dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inferq.workers import core_share
from inferq.workers.batcher import DynamicBatcher
from inferq.workers.core_share import LEND_MIN_S, CoreShare, create_share
from inferq.workers.supervisor import node_specs
from tests.conftest import REPO_ROOT

LONG_PASS_S = 0.1


class Threads:
    """Stands in for torch.set_num_threads: records what each pass was set to."""

    def __init__(self) -> None:
        self.set_to: list[int] = []

    def __call__(self, threads: int) -> None:
        self.set_to.append(threads)


def _node(folder: Path, index: int, threads: Threads | None = None, *, max_threads: int = 2) -> CoreShare:
    return CoreShare(folder, index=index, threads=1, max_threads=max_threads, set_threads=threads or Threads())


def test_a_lone_job_borrows_the_cores_of_idle_neighbours_and_gives_them_back(tmp_path: Path) -> None:
    folder = create_share(3, tmp_path)
    threads = Threads()
    node = _node(folder, 0, threads, max_threads=3)
    _node(folder, 1), _node(folder, 2)
    node.hold(1)
    with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert lent
        assert threads.set_to == [3]
    assert node.busy_flags() == [True, False, False]
    node.release(1)
    assert node.busy_flags() == [False, False, False]
    # The cores are handed back with the pass (their locks), so a neighbour that gets a job now computes at once
    neighbour = _node(folder, 1)
    neighbour.hold(1)
    entered = threading.Event()

    def neighbour_pass() -> None:
        with neighbour.computing(jobs=1, expected_s=None):
            entered.set()

    thread = threading.Thread(target=neighbour_pass)
    thread.start()
    assert entered.wait(1)
    thread.join(timeout=5)
    with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert lent  # the next pass borrows only the core still idle
    _node(folder, 2).hold(1)
    with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert not lent  # and one that can borrow nothing runs on the node's own thread again
    assert threads.set_to == [3, 2, 1]


def test_lone_passes_one_after_another_keep_the_borrowed_thread_count(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    threads = Threads()
    node, _ = _node(folder, 0, threads), _node(folder, 1)
    node.hold(1)
    for _ in range(3):
        with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
            assert lent
    assert threads.set_to == [2]  # set once: changing the count costs each pass


def test_no_core_is_borrowed_from_a_node_that_holds_a_job(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    threads = Threads()
    node, neighbour = _node(folder, 0, threads), _node(folder, 1)
    node.hold(1)
    neighbour.hold(1)  # claimed a job: it decodes now and computes next
    with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert not lent
    assert threads.set_to == []


def test_no_core_is_borrowed_while_the_borrower_holds_other_jobs(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    node, _ = _node(folder, 0), _node(folder, 1)
    node.hold(3)  # a batch of one, and two more jobs decoding beside it
    with node.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert not lent
    with node.computing(jobs=3, expected_s=LONG_PASS_S) as lent:
        assert lent


@pytest.mark.parametrize("expected_s", [None, LEND_MIN_S / 2])
def test_a_short_or_unmeasured_pass_borrows_nothing(tmp_path: Path, expected_s: float | None) -> None:
    folder = create_share(2, tmp_path)
    node, _ = _node(folder, 0), _node(folder, 1)
    node.hold(1)
    with node.computing(jobs=1, expected_s=expected_s) as lent:
        assert not lent


def test_a_node_waits_for_its_lent_core_before_it_computes(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    borrower, lender = _node(folder, 0), _node(folder, 1)
    borrower.hold(1)
    events: list[str] = []
    with borrower.computing(jobs=1, expected_s=LONG_PASS_S) as lent:
        assert lent
        lender.hold(1)  # a job reaches the lender while its core is lent

        def lender_pass() -> None:
            with lender.computing(jobs=1, expected_s=LONG_PASS_S) as lender_lent:
                events.append(f"lender computes, lent={lender_lent}")

        thread = threading.Thread(target=lender_pass)
        thread.start()
        time.sleep(0.3)
        events.append("borrower ends its pass")
    thread.join(timeout=5)
    assert events == ["borrower ends its pass", "lender computes, lent=False"]


def test_a_restarted_node_clears_the_flag_its_predecessor_left(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    _node(folder, 1).hold(1)  # then the process dies without releasing
    assert _node(folder, 0).busy_flags() == [False, True]
    _node(folder, 1)
    assert _node(folder, 0).busy_flags() == [False, False]


_BORROWER = """
import sys, time
from pathlib import Path
from inferq.workers.core_share import CoreShare
node = CoreShare(Path(sys.argv[1]), index=0, threads=1, max_threads=2, set_threads=lambda n: None)
node.hold(1)
with node.computing(jobs=1, expected_s=1.0) as lent:
    print(f"lent={lent}", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def _borrower(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """A real process, node 0 of the share, in the middle of a pass on its neighbour's borrowed core."""
    child = subprocess.Popen(
        [sys.executable, "-c", _BORROWER, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "lent=True"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_borrower_that_dies_mid_pass_gives_the_core_back(tmp_path: Path) -> None:
    # Given a real process that borrowed its neighbour's core and computes on it
    folder = create_share(2, tmp_path)
    lender = _node(folder, 1)
    with _borrower(folder) as child:
        lender.hold(1)
        entered = threading.Event()

        def lender_pass() -> None:
            with lender.computing(jobs=1, expected_s=LONG_PASS_S):
                entered.set()

        thread = threading.Thread(target=lender_pass, daemon=True)
        thread.start()
        assert not entered.wait(0.5)  # the lender waits for its core
        # When the borrower is killed in the middle of its pass
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        # Then the kernel's release of its locks hands the core back at once
        assert entered.wait(5)


def test_the_batcher_borrows_only_once_it_knows_a_pass_is_long(tmp_path: Path) -> None:
    folder = create_share(2, tmp_path)
    threads = Threads()
    cores, _ = _node(folder, 0, threads), _node(folder, 1)

    def slow_model(rows: np.ndarray) -> np.ndarray:
        time.sleep(LONG_PASS_S)
        return rows

    batcher = DynamicBatcher(
        name="slow",
        run_batch=slow_model,
        gate=lambda attempts: [True] * len(attempts),
        max_batch_size=4,
        batch_wait_ms=0,
        cores=cores,
    )
    try:
        for job in range(2):
            cores.hold(1)
            batcher.submit(f"job-{job}", 1, np.zeros((1, 2), dtype=np.float32)).result(timeout=5)
            cores.release(1)
    finally:
        batcher.stop()
    # The first pass is not yet measured and runs on the node's own core; the second borrows the idle neighbour's.
    assert threads.set_to == [2]


def test_inferq_worker_gives_each_cpu_node_its_place_in_the_share(tmp_path: Path) -> None:
    specs = node_specs(
        pool="cpu", queues=["fraud"], processes=2, torch_threads=1, slots=4, loglevel="info", core_share=tmp_path
    )
    assert [(s.env["INFERQ_CORE_SHARE_DIR"], s.env["INFERQ_NODE_INDEX"]) for s in specs] == [
        (str(tmp_path), "0"),
        (str(tmp_path), "1"),
    ]
    alone = node_specs(pool="cpu", queues=["fraud"], processes=1, torch_threads=1, slots=4, loglevel="info")
    assert "INFERQ_CORE_SHARE_DIR" not in alone[0].env


def test_a_stopped_borrower_delays_its_lender_only_for_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a real borrower process, frozen with SIGSTOP in the middle of its borrowed pass
    monkeypatch.setattr(core_share, "RECLAIM_WAIT_S", 0.5)
    folder = create_share(2, tmp_path)
    lender = _node(folder, 1)
    with _borrower(folder) as child:
        os.kill(child.pid, signal.SIGSTOP)
        lender.hold(1)
        # When the lender has a job to compute, it waits for its core, but not for ever
        started = time.monotonic()
        with lender.computing(jobs=1, expected_s=LONG_PASS_S):
            waited_s = time.monotonic() - started
        assert 0.5 <= waited_s < 3.0


def test_nodes_stop_spinning_soon_after_a_pass_unless_the_user_chose_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A finished pass's OpenMP threads spinning for milliseconds would take a core from whatever runs next.
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    [node] = node_specs(pool="cpu", queues=["fraud"], processes=1, torch_threads=1, slots=4, loglevel="info")
    assert node.env["GOMP_SPINCOUNT"] == "10000"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    [node] = node_specs(pool="cpu", queues=["fraud"], processes=1, torch_threads=1, slots=4, loglevel="info")
    assert "GOMP_SPINCOUNT" not in node.env
    assert node.env["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    [node] = node_specs(pool="cpu", queues=["fraud"], processes=1, torch_threads=1, slots=4, loglevel="info")
    assert node.env["GOMP_SPINCOUNT"] == "300000"
