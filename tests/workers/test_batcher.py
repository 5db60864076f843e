"""The dynamic batcher with real models and a real job store: batched equals alone; failures, cancels stay per job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.samples import write_samples
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.errors import InferqError
from inferq.protocol.jobs import JobStore, new_job_id
from inferq.protocol.registry import load_registry
from inferq.workers import batcher as batcher_module
from inferq.workers.batcher import BatchOutput, DynamicBatcher, Fenced, Submission
from inferq.workers.inference import ModelRunner, load_runner
from inferq.workers.weights import ensure_generated_weights

REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


def _runner(model: str) -> ModelRunner:
    settings = Settings()
    spec = REGISTRY.get_model(model)
    ensure_generated_weights(spec, settings)
    return load_runner(spec, settings, torch.device("cpu"))


@pytest.fixture(scope="module")
def fraud() -> ModelRunner:
    return _runner("fraud")


@pytest.fixture(scope="module")
def xray() -> ModelRunner:
    return _runner("chest-xray")


@pytest.fixture
def stores(redis_url: str) -> Iterator[Stores]:
    stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=60)
    yield stores
    stores.text.close()


def _claimed(jobs: JobStore, count: int) -> list[tuple[str, int]]:
    claimed = []
    for _ in range(count):
        job_id = new_job_id()
        jobs.create(job_id, {"model": "m", "model_version": "1", "blob_ref": "b", "max_attempts": "3"})
        claimed.append((job_id, jobs.claim_result(jobs.claim(job_id, node="t", pid=1, lease_s=60)).token))
    return claimed


def _batcher(runner: ModelRunner, jobs: JobStore, **overrides: float) -> DynamicBatcher:
    options = {"max_batch_size": 64, "batch_wait_ms": 200.0, **overrides}
    return DynamicBatcher(
        name=runner.spec.name,
        run_batch=runner.infer,
        gate=jobs.begin,
        max_batch_size=int(options["max_batch_size"]),
        batch_wait_ms=options["batch_wait_ms"],
    )


def _assert_each_equals_alone(runner: ModelRunner, inputs: list[np.ndarray], outputs: list[BatchOutput]) -> None:
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out.rows, runner.infer(x), atol=1e-5)


def test_batched_tensor_jobs_equal_each_job_run_alone(fraud: ModelRunner, stores: Stores) -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((rows, 30)).astype(np.float32) for rows in (1, 3, 2, 5)]
    claimed = _claimed(stores.jobs, len(inputs))
    batcher = _batcher(fraud, stores.jobs)
    for _ in inputs:
        batcher.expect()
    futures = [batcher.submit(j, t, x) for (j, t), x in zip(claimed, inputs, strict=True)]
    outputs = [f.result(timeout=30) for f in futures]
    batcher.stop()
    assert batcher.batches_run == [4]  # the four expected jobs ran as one forward pass
    assert [out.batch_jobs for out in outputs] == [4] * 4
    _assert_each_equals_alone(fraud, inputs, outputs)


def test_batched_images_equal_each_image_run_alone(xray: ModelRunner, stores: Stores, tmp_path) -> None:  # type: ignore[no-untyped-def]
    samples = write_samples(tmp_path)[:3]
    tensors = [xray.prepare(path.read_bytes())[0][np.newaxis] for path in samples]
    claimed = _claimed(stores.jobs, len(tensors))
    batcher = _batcher(xray, stores.jobs, max_batch_size=8)
    for _ in tensors:
        batcher.expect()
    futures = [batcher.submit(j, t, x) for (j, t), x in zip(claimed, tensors, strict=True)]
    outputs = [f.result(timeout=120) for f in futures]
    batcher.stop()
    assert batcher.batches_run == [3]
    _assert_each_equals_alone(xray, tensors, outputs)


def test_a_bad_input_in_a_batch_fails_only_its_own_job(fraud: ModelRunner, stores: Stores) -> None:
    good = np.zeros((2, 30), dtype=np.float32)
    bad = np.full((1, 30), np.nan, dtype=np.float32)  # the model answers NaN: an inference error
    claimed = _claimed(stores.jobs, 3)
    batcher = _batcher(fraud, stores.jobs)
    for _ in range(3):
        batcher.expect()
    futures = [batcher.submit(j, t, x) for (j, t), x in zip(claimed, [good, bad, good], strict=True)]
    assert futures[0].result(timeout=30).rows.shape == (2, 1)
    with pytest.raises(Exception, match="NaN"):
        futures[1].result(timeout=30)
    assert futures[2].result(timeout=30).rows.shape == (2, 1)
    batcher.stop()


def test_a_job_cancelled_while_it_waits_in_the_batcher_is_dropped(fraud: ModelRunner, stores: Stores) -> None:
    # Given a batcher busy with a first batch (its forward pass held until released)
    started, release = threading.Event(), threading.Event()

    def slow_infer(batch: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(timeout=30)
        return fraud.infer(batch)

    batcher = DynamicBatcher(
        name="fraud", run_batch=slow_infer, gate=stores.jobs.begin, max_batch_size=64, batch_wait_ms=0
    )
    claimed = _claimed(stores.jobs, 3)
    x = np.zeros((1, 30), dtype=np.float32)
    first = batcher.submit(*claimed[0], x)
    assert started.wait(timeout=30)
    # When two more jobs wait behind it and one of them is cancelled
    waiting = [batcher.submit(*claimed[1], x), batcher.submit(*claimed[2], x)]
    stores.jobs.cancel(claimed[1][0])
    release.set()
    # Then the cancelled job never reaches the model and the others do
    assert first.result(timeout=30).batch_jobs == 1
    with pytest.raises(Fenced):
        waiting[0].result(timeout=30)
    assert waiting[1].result(timeout=30).batch_jobs == 1
    assert stores.jobs.view(claimed[1][0])["status"] == "cancelled"
    batcher.stop()


def test_jobs_handed_over_together_run_as_one_batch(fraud: ModelRunner, stores: Stores) -> None:
    # A bulk chunk: five jobs expected at once and handed over in one call run as one forward pass.
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1, 30)).astype(np.float32) for _ in range(5)]
    claimed = _claimed(stores.jobs, len(inputs))
    batcher = _batcher(fraud, stores.jobs, batch_wait_ms=60_000)
    batcher.expect(count=len(inputs))
    futures = batcher.submit_many([Submission(j, t, x) for (j, t), x in zip(claimed, inputs, strict=True)])
    outputs = [f.result(timeout=30) for f in futures]
    batcher.stop()
    assert batcher.batches_run == [5]
    _assert_each_equals_alone(fraud, inputs, outputs)


def test_jobs_handed_to_a_stopped_batcher_all_fail(fraud: ModelRunner, stores: Stores) -> None:
    batcher = _batcher(fraud, stores.jobs)
    batcher.stop()
    x = np.zeros((1, 30), dtype=np.float32)
    futures = batcher.submit_many([Submission(j, t, x) for j, t in _claimed(stores.jobs, 3)])
    for future in futures:
        with pytest.raises(InferqError, match="stopped"):
            future.result(timeout=5)


def test_a_lone_job_does_not_wait_for_a_batch(fraud: ModelRunner, stores: Stores) -> None:
    # No other job is on its way, so a long batch_wait_ms must not delay it.
    [(job_id, token)] = _claimed(stores.jobs, 1)
    batcher = _batcher(fraud, stores.jobs, batch_wait_ms=60_000)
    batcher.expect()
    out = batcher.submit(job_id, token, np.zeros((1, 30), dtype=np.float32)).result(timeout=20)
    assert out.batch_jobs == 1
    batcher.stop()


def test_an_isolated_job_runs_alone(fraud: ModelRunner, stores: Stores) -> None:
    claimed = _claimed(stores.jobs, 3)
    batcher = _batcher(fraud, stores.jobs)
    x = np.zeros((1, 30), dtype=np.float32)
    for _ in range(3):
        batcher.expect()
    futures = [batcher.submit(j, t, x, isolate=(i == 1)) for i, (j, t) in enumerate(claimed)]
    sizes = [f.result(timeout=30).batch_jobs for f in futures]
    batcher.stop()
    assert sizes[1] == 1 and sizes[0] == sizes[2] == 2


def test_batches_respect_max_batch_size_in_rows(fraud: ModelRunner, stores: Stores) -> None:
    claimed = _claimed(stores.jobs, 5)
    batcher = _batcher(fraud, stores.jobs, max_batch_size=4)
    x = np.zeros((2, 30), dtype=np.float32)
    for _ in range(5):
        batcher.expect()
    futures = [batcher.submit(j, t, x) for j, t in claimed]
    for f in futures:
        f.result(timeout=30)
    batcher.stop()
    assert sorted(batcher.batches_run) == [1, 2, 2] and sum(batcher.batches_run) == 5


def _held_batcher(
    fraud: ModelRunner, stores: Stores, ran: list[list[int]], *, max_batch_size: int = 64
) -> tuple[DynamicBatcher, threading.Event, threading.Event]:
    """A batcher whose first forward pass waits to be released; `ran` records each pass's rows (their first value)."""
    started, release = threading.Event(), threading.Event()

    def infer(batch: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(timeout=30)
        ran.append([int(v) for v in batch[:, 0]])
        return fraud.infer(batch)

    batcher = DynamicBatcher(
        name="fraud", run_batch=infer, gate=stores.jobs.begin, max_batch_size=max_batch_size, batch_wait_ms=0
    )
    return batcher, started, release


def test_waiting_jobs_run_by_priority_then_deadline_one_class_per_batch(fraud: ModelRunner, stores: Stores) -> None:
    # Given a batcher busy with a first job, and jobs waiting behind it in arrival order
    ran: list[list[int]] = []
    batcher, started, release = _held_batcher(fraud, stores, ran, max_batch_size=2)
    claimed = _claimed(stores.jobs, 7)
    first = batcher.submit(*claimed[0], np.zeros((1, 30), dtype=np.float32))
    assert started.wait(timeout=30)
    # (label, priority rank, deadline): routine late, routine soon, stat, urgent, routine soonest, stat
    waiting = [(1, 2, 500.0), (2, 2, 200.0), (3, 0, 900.0), (4, 1, 100.0), (5, 2, 100.0), (6, 0, 800.0)]
    futures = [
        batcher.submit(*claimed[label], np.full((1, 30), label, dtype=np.float32), priority=rank, deadline_s=due)
        for label, rank, due in waiting
    ]
    # When the first batch ends
    release.set()
    first.result(timeout=30)
    sizes = [f.result(timeout=30).batch_jobs for f in futures]
    batcher.stop()
    # Then stat goes first (earliest deadline first), then urgent alone, then routine by deadline, two per batch
    assert ran[1:] == [[6, 3], [4], [5, 2], [1]]
    assert sizes == [1, 2, 2, 1, 2, 2]


def test_a_job_that_expires_while_it_waits_in_the_batcher_is_dropped(fraud: ModelRunner, stores: Stores) -> None:
    # Given a job with a short queue deadline, claimed in time, waiting behind a running batch
    ran: list[list[int]] = []
    batcher, started, release = _held_batcher(fraud, stores, ran)
    [busy] = _claimed(stores.jobs, 1)
    job_id = new_job_id()
    stores.jobs.create(job_id, {"model": "m", "model_version": "1", "blob_ref": "b"}, queue_s=0.5)
    claim = stores.jobs.claim_result(stores.jobs.claim(job_id, node="t", pid=1, lease_s=60))
    assert claim.claimed and claim.expires_at_s < float("inf")
    first = batcher.submit(*busy, np.zeros((1, 30), dtype=np.float32))
    assert started.wait(timeout=30)
    late = batcher.submit(job_id, claim.token, np.ones((1, 30), dtype=np.float32), deadline_s=claim.expires_at_s)
    # When its deadline passes before its batch starts
    time.sleep(0.8)
    release.set()
    first.result(timeout=30)
    # Then it never reaches the model and ends expired
    with pytest.raises(Fenced):
        late.result(timeout=30)
    batcher.stop()
    assert ran == [[0]]
    assert stores.jobs.view(job_id)["status"] == "expired"


def _paced_batcher(
    stores: Stores,
    ran: list[list[int]],
    *,
    row_s: float,
    max_batch_ms: float | None,
    probe: bool = False,
    urgent_seen: threading.Event | None = None,
) -> DynamicBatcher:
    """A batcher over a stand-in model that costs `row_s` per row (what a CPU forward pass of an X-ray does).
    `urgent_seen` is set once its probe has found a more urgent job waiting."""

    def infer(batch: np.ndarray) -> np.ndarray:
        time.sleep(row_s * len(batch))
        ran.append([int(v) for v in batch[:, 0]])
        return batch[:, :1].copy()

    def urgent_waiting(rank: int) -> bool:
        waiting = stores.jobs.more_urgent_waiting("m", rank)
        if waiting and urgent_seen is not None:
            urgent_seen.set()
        return waiting

    return DynamicBatcher(
        name="m",
        run_batch=infer,
        gate=stores.jobs.begin,
        max_batch_size=8,
        batch_wait_ms=2000,
        max_batch_ms=max_batch_ms,
        urgent_waiting=urgent_waiting if probe else None,
    )


def test_a_batch_holds_no_more_rows_than_fit_in_max_batch_ms(stores: Stores) -> None:
    # Given a model that takes 40 ms a row, eight rows allowed, but 100 ms of compute per batch
    ran: list[list[int]] = []
    batcher = _paced_batcher(stores, ran, row_s=0.04, max_batch_ms=100)
    claimed = _claimed(stores.jobs, 9)
    # When one job has run (the batcher now knows a row's cost) and eight more wait together
    batcher.submit(*claimed[0], np.zeros((1, 30), dtype=np.float32)).result(timeout=30)
    for _ in range(8):
        batcher.expect()
    futures = [batcher.submit(*c, np.full((1, 30), i, dtype=np.float32)) for i, c in enumerate(claimed[1:], 1)]
    sizes = [f.result(timeout=30).batch_jobs for f in futures]
    batcher.stop()
    # Then they run two at a time (80 ms), in arrival order, not as one 320 ms pass
    assert batcher.row_cap() == 2
    assert ran[1:] == [[1, 2], [3, 4], [5, 6], [7, 8]] and sizes == [2] * 8


def test_without_max_batch_ms_the_batch_is_max_batch_size(stores: Stores) -> None:
    ran: list[list[int]] = []
    batcher = _paced_batcher(stores, ran, row_s=0.04, max_batch_ms=None)
    claimed = _claimed(stores.jobs, 9)
    batcher.submit(*claimed[0], np.zeros((1, 30), dtype=np.float32)).result(timeout=30)
    for _ in range(8):
        batcher.expect()
    futures = [batcher.submit(*c, np.full((1, 30), i, dtype=np.float32)) for i, c in enumerate(claimed[1:], 1)]
    assert [f.result(timeout=30).batch_jobs for f in futures] == [8] * 8
    batcher.stop()


def _queued_stat(jobs: JobStore) -> str:
    job_id = new_job_id()
    jobs.create(job_id, {"model": "m", "model_version": "1", "blob_ref": "b", "priority": "stat"})
    return job_id


@pytest.mark.parametrize("probe", [True, False])
def test_a_routine_batch_waits_for_a_stat_job_being_fetched(
    stores: Stores, probe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given routine jobs waiting behind a running batch, and a STAT job queued for the model meanwhile.
    # The claim below stands for a worker's fetch into the slot the batch frees, which comes after the batcher's
    # probe, and must land within the hold: 250 ms instead of 50 leaves room for a busy machine (the suite runs on
    # two processes) and stays below the routine batch's 300 ms, past which there would be no probe.
    monkeypatch.setattr(batcher_module, "URGENT_CLAIM_WAIT_S", 0.25)
    urgent_seen = threading.Event()
    ran: list[list[int]] = []
    batcher = _paced_batcher(stores, ran, row_s=0.15, max_batch_ms=None, probe=probe, urgent_seen=urgent_seen)
    routine = _claimed(stores.jobs, 3)
    x = np.zeros((1, 30), dtype=np.float32)
    first = batcher.submit(*routine[0], x)
    time.sleep(0.05)  # the first batch is computing
    waiting = [batcher.submit(*c, np.full((1, 30), i, dtype=np.float32)) for i, c in enumerate(routine[1:], 1)]
    stat_id = _queued_stat(stores.jobs)
    # When the running batch ends, and the slot it frees fetches and claims the STAT job a moment later
    first.result(timeout=30)
    if probe:
        assert urgent_seen.wait(timeout=5)  # the probe found the STAT job waiting before it is claimed
    claim = stores.jobs.claim_result(stores.jobs.claim(stat_id, node="t", pid=1, lease_s=60))
    batcher.expect(0)
    time.sleep(0.1)  # decoding
    stat = batcher.submit(stat_id, claim.token, np.full((1, 30), 9, dtype=np.float32), priority=0)
    stat.result(timeout=30)
    for future in waiting:
        future.result(timeout=30)
    batcher.stop()
    # Then, with the probe, the STAT job runs before the routine batch that would otherwise have started first
    assert ran[0] == [0]
    assert ran[1] == ([9] if probe else [1, 2])


def _long_urgent_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold of a second instead of 50 ms: a batch held or not then differ by far more than a busy machine's
    scheduling delays (the suite runs on two processes)."""
    monkeypatch.setattr(batcher_module, "URGENT_CLAIM_WAIT_S", 1.0)


def test_no_urgent_job_waiting_costs_a_routine_batch_no_wait(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    _long_urgent_hold(monkeypatch)
    ran: list[list[int]] = []
    batcher = _paced_batcher(stores, ran, row_s=0.0, max_batch_ms=None, probe=True)
    [job] = _claimed(stores.jobs, 1)
    started_s = time.monotonic()
    batcher.submit(*job, np.zeros((1, 30), dtype=np.float32)).result(timeout=30)
    batcher.stop()
    assert time.monotonic() - started_s < 0.5  # below URGENT_CLAIM_WAIT_S: nothing was waited for


def test_jobs_without_a_deadline_of_their_own_run_in_arrival_order(fraud: ModelRunner, stores: Stores) -> None:
    # Given a flooding tenant's job queued before another tenant's (so with an earlier default keep time), which
    # the broker's turn-taking delivered second, both claimed as a worker claims them
    ran: list[list[int]] = []
    batcher, started, release = _held_batcher(fraud, stores, ran, max_batch_size=1)
    [busy] = _claimed(stores.jobs, 1)
    older, newer = new_job_id(), new_job_id()
    for job_id in (older, newer):
        stores.jobs.create(job_id, {"model": "m", "model_version": "1", "blob_ref": "b"})
        time.sleep(0.01)
    claims = {j: stores.jobs.claim_result(stores.jobs.claim(j, node="t", pid=1, lease_s=60)) for j in (older, newer)}
    assert claims[older].expires_at_s < claims[newer].expires_at_s
    first = batcher.submit(*busy, np.zeros((1, 30), dtype=np.float32))
    assert started.wait(timeout=30)
    # When the newer one arrives in the batcher first
    futures = [
        batcher.submit(
            j, claims[j].token, np.full((1, 30), label, dtype=np.float32), deadline_s=claims[j].deadline_at_s
        )
        for label, j in ((2, newer), (1, older))
    ]
    release.set()
    first.result(timeout=30)
    for future in futures:
        future.result(timeout=30)
    batcher.stop()
    # Then it runs first: the keep time is no deadline, and ordering by it would starve the second tenant
    assert ran[1:] == [[2], [1]]


def test_a_model_with_millisecond_batches_never_holds_one_for_an_urgent_job(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a STAT job queued for the model, and batches that take far less than the hold would
    _long_urgent_hold(monkeypatch)
    ran: list[list[int]] = []
    batcher = _paced_batcher(stores, ran, row_s=0.001, max_batch_ms=None, probe=True)
    _queued_stat(stores.jobs)
    assert stores.jobs.more_urgent_waiting("m", 2)
    first, second = _claimed(stores.jobs, 2)
    batcher.submit(*first, np.zeros((1, 30), dtype=np.float32)).result(timeout=30)
    # When a routine job comes next
    started_s = time.monotonic()
    batcher.submit(*second, np.ones((1, 30), dtype=np.float32)).result(timeout=30)
    batcher.stop()
    # Then it runs at once: a hold would cost it more than the batch could cost the STAT job
    assert time.monotonic() - started_s < 0.5


def test_a_batch_of_a_few_quick_rows_costs_no_probe(stores: Stores) -> None:
    # Given a model whose full batches would outlast the hold (8 rows of 20 ms) but a lone routine job (20 ms)
    probes: list[int] = []

    def probe(rank: int) -> bool:
        probes.append(rank)
        return True

    batcher = DynamicBatcher(
        name="m",
        run_batch=lambda batch: (time.sleep(0.02 * len(batch)), batch[:, :1].copy())[1],
        gate=stores.jobs.begin,
        max_batch_size=8,
        batch_wait_ms=0,
        urgent_waiting=probe,
    )
    first, second, third = _claimed(stores.jobs, 3)
    batcher.submit(*first, np.zeros((1, 30), dtype=np.float32)).result(timeout=30)  # measures the row cost
    # When it runs alone, no round trip asks for urgent jobs: the batch would delay one less than a hold
    batcher.submit(*second, np.zeros((1, 30), dtype=np.float32)).result(timeout=30)
    assert probes == []
    # Then three rows waiting at once (60 ms) are worth the probe
    batcher.expect(count=1)
    batcher.submit_many([Submission(*third, np.zeros((3, 30), dtype=np.float32))])[0].result(timeout=30)
    batcher.stop()
    assert probes == [2]


def test_a_job_is_marked_computing_only_once_the_compute_thread_is_free(fraud: ModelRunner, stores: Stores) -> None:
    # Two models of one node share its compute thread. While one model's pass runs, the other model's job must not
    # be marked computing: should that pass kill the process, the waiting job would be blamed for it.
    compute = ThreadPoolExecutor(max_workers=1)
    started, release = threading.Event(), threading.Event()

    def held_infer(batch: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(timeout=30)
        return fraud.infer(batch)

    def batcher(name: str, run_batch: Callable[[np.ndarray], np.ndarray]) -> DynamicBatcher:
        return DynamicBatcher(
            name=name,
            run_batch=run_batch,
            gate=stores.jobs.begin,
            max_batch_size=8,
            batch_wait_ms=0,
            compute_thread=compute,
        )

    slow, quick = batcher("slow", held_infer), batcher("quick", fraud.infer)
    [(held_id, held_token), (job_id, token)] = _claimed(stores.jobs, 2)
    x = np.zeros((1, 30), dtype=np.float32)
    held = slow.submit(held_id, held_token, x)
    assert started.wait(timeout=30)
    waiting = quick.submit(job_id, token, x)
    time.sleep(0.5)
    assert "computing_at" not in stores.jobs.fields(job_id)
    assert "computing_at" in stores.jobs.fields(held_id)
    release.set()
    assert waiting.result(timeout=30).batch_jobs == 1 and held.result(timeout=30).batch_jobs == 1
    assert "computing_at" in stores.jobs.fields(job_id)
    slow.stop()
    quick.stop()
    compute.shutdown()
