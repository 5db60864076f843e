"""Dynamic batching inside one worker process: jobs of one model that are here at the same time run as one forward pass.

Modelled on Ray Serve's `@serve.batch` and Triton's dynamic batcher: callers put (item, future) pairs on a queue; one
thread per model takes up to `max_batch_size` rows, waiting at most `batch_wait_ms` after the first, runs them
together, and resolves every future, on success and on failure. Unlike a fixed wait, it waits only while more jobs
are known to be on their way (claimed by this process and still decoding): a lone job at low load runs at once,
and under load batches fill while the previous one computes.

Each job stays its own Celery task; the batcher never sees the broker. What it does need from the job store is one
check per batch that every attempt still owns its job (`begin`), so that a job cancelled while it waited here, taken
over after its lease lapsed, or past its queue deadline, never costs compute.

Order: the most urgent job waiting goes first (priority class, then the earliest deadline a client asked for, then
arrival here; arrival is the broker's order, in which tenants take turns, so a job without a deadline of its own is
not ordered by the default keep time, which would hand a flooding tenant's older jobs every batch), and a batch
holds jobs of one priority class only: on a CPU a forward pass costs about its rows, so a STAT job filled up with
routine ones would wait for their compute too. The batch is chosen once the jobs known to be on their way (claimed
here and decoding) have arrived, or `batch_wait_ms` has passed, so that a STAT job fetched with routine ones is not
left out of the batch that starts next.

How long a STAT job waits for the batch in progress is bounded twice over:
- `max_batch_ms`: a batch holds no more rows than fit in that much compute, measured as the process runs (on a
  CPU a batch of eight X-rays takes half a second, and batching gains little there; on a GPU the cap never bites);
- before a batch of a lower class starts, where batches take longer than the hold below, one script call asks the job
  store whether a more urgent job of this model is still waiting to be claimed. If one is, the batcher gives it a
  moment to be fetched into the slots the last batch freed (`URGENT_CLAIM_WAIT_S`) and, once it is claimed here, to
  decode, so that it is not overtaken by one more routine batch that happened to start first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from inferq.protocol.errors import InferqError
from inferq.protocol.metrics import record_batch
from inferq.protocol.priority import Priority
from inferq.workers.core_share import CoreShare

log = logging.getLogger(__name__)

BatchRunner = Callable[[np.ndarray], np.ndarray]
BatchGate = Callable[[list[tuple[str, int]]], list[bool]]
# rank -> whether a job of a more urgent class is waiting in the broker for this model.
UrgentProbe = Callable[[int], bool]

ROUTINE_RANK = Priority.ROUTINE.rank
# After a batch, the slots it freed fetch from the broker (STAT first) and claim: this long is allowed for that.
URGENT_CLAIM_WAIT_S = 0.05
# A more urgent job claimed here is waited for while it decodes, at most this long (a JPEG 2000 film: ~0.2 s).
URGENT_DECODE_WAIT_S = 1.0
# Weight of the newest batch in the running estimate of compute seconds per row.
_ROW_S_SMOOTHING = 0.3


class Fenced(InferqError):
    """The attempt no longer owns its job (cancelled, timed out or taken over): its work is dropped."""

    code = "fenced"


@dataclass(frozen=True)
class BatchOutput:
    """One job's rows of a batch's outputs, and how many jobs ran in that batch."""

    rows: np.ndarray
    batch_jobs: int


class Submission(NamedTuple):
    """One job handed to the batcher: see `DynamicBatcher.submit` for the fields."""

    job_id: str
    token: int
    rows: np.ndarray
    isolate: bool = False
    priority: int = ROUTINE_RANK
    deadline_s: float = float("inf")


@dataclass
class _Item:
    job_id: str
    token: int
    rows: np.ndarray
    isolate: bool
    priority: int
    deadline_s: float
    enqueued_s: float
    future: Future[BatchOutput] = field(default_factory=Future)

    @property
    def order(self) -> tuple[int, float, float]:
        return (self.priority, self.deadline_s, self.enqueued_s)


class DynamicBatcher:
    """Batches one model's jobs in this process; `submit` is called from many task threads."""

    def __init__(
        self,
        *,
        name: str,
        run_batch: BatchRunner,
        gate: BatchGate,
        max_batch_size: int,
        batch_wait_ms: float,
        max_batch_ms: float | None = None,
        urgent_waiting: UrgentProbe | None = None,
        cores: CoreShare | None = None,
        compute_thread: Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.name = name
        self._run_batch = run_batch
        self._gate = gate
        self._max_rows = max_batch_size
        self._wait_s = batch_wait_ms / 1000.0
        self._max_batch_s = max_batch_ms / 1000.0 if max_batch_ms else None
        self._row_s: float | None = None  # compute seconds per row, as measured here
        self._urgent_waiting = urgent_waiting
        self._cores = cores
        # The node's one thread for torch (workers.compute): batches are gated and run there, not in this thread.
        self._compute_thread = compute_thread
        self._items: list[_Item] = []
        self._arriving: Counter[int] = Counter()  # jobs claimed here and still decoding, by priority rank
        self._cond = threading.Condition()
        self._stopped = False
        self.batches_run: list[int] = []  # recent batch sizes, for logs and tests
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # --- called by task threads

    def expect(self, priority: int = ROUTINE_RANK, count: int = 1) -> None:
        """`count` jobs of this model (priority rank `priority`) were claimed here and are decoding: worth waiting
        for them."""
        with self._cond:
            self._arriving[priority] += count
            self._cond.notify_all()

    def unexpect(self, priority: int = ROUTINE_RANK) -> None:
        """An expected job will not come (its decoding failed)."""
        with self._cond:
            self._arrived(priority)
            self._cond.notify_all()

    def submit(
        self,
        job_id: str,
        token: int,
        rows: np.ndarray,
        *,
        isolate: bool = False,
        priority: int = ROUTINE_RANK,
        deadline_s: float = float("inf"),
    ) -> Future[BatchOutput]:
        """Queue one job's rows (leading axis: rows of the batch); the future holds its rows of the outputs.
        `priority` is a rank (0 most urgent: protocol.priority), `deadline_s` the job's queue deadline (any clock;
        only compared with other jobs' deadlines)."""
        [future] = self.submit_many([Submission(job_id, token, rows, isolate, priority, deadline_s)])
        return future

    def submit_many(self, submissions: list[Submission]) -> list[Future[BatchOutput]]:
        """Queue several jobs at once (a bulk chunk's): one wake-up of the batcher thread instead of one per job."""
        now_s = time.monotonic()
        items = [_Item(*submission, enqueued_s=now_s) for submission in submissions]
        with self._cond:
            for item in items:
                if self._stopped:
                    item.future.set_exception(InferqError("the batcher is stopped"))
                    continue
                self._arrived(item.priority)
                self._items.append(item)
            self._cond.notify_all()
        return [item.future for item in items]

    def row_cap(self) -> int:
        """Most rows the next batch may hold: `max_batch_size`, fewer where `max_batch_ms` of compute fits less."""
        if self._max_batch_s is None or self._row_s is None:
            return self._max_rows
        return max(1, min(self._max_rows, int(self._max_batch_s / self._row_s)))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # --- the batcher thread

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._items:
                if self._stopped:
                    return None
                self._cond.wait()
            self._gather()
            rank = min(item.priority for item in self._items)
            worth_a_probe = rank > 0 and self._batch_outlasts_a_hold(rank)
        if worth_a_probe and self._more_urgent_waiting(rank):  # a round trip: unlocked
            with self._cond:
                self._await_more_urgent(rank)
        with self._cond:
            first = self._take_first()
            if first.isolate:
                return [first]
            return self._fill(first)

    def _arrived(self, priority: int) -> None:
        if self._arriving[priority] > 0:
            self._arriving[priority] -= 1

    def _gather(self) -> None:
        """Wait, at most `batch_wait_ms`, while jobs are on their way and a batch's worth is not here yet."""
        deadline_s = time.monotonic() + self._wait_s
        while sum(len(item.rows) for item in self._items) < self.row_cap() and self._arriving.total() > 0:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0 or self._stopped:
                return
            self._cond.wait(timeout=remaining_s)

    def _batch_outlasts_a_hold(self, rank: int) -> bool:
        """Holding the next batch (class `rank`) back for an urgent job pays only where that batch would delay it
        longer than the hold does: not where it takes milliseconds (a GPU, a small model, a few rows), which then
        costs no probe. Called under the lock."""
        if self._row_s is None:
            return False
        rows = min(self.row_cap(), sum(len(item.rows) for item in self._items if item.priority == rank))
        return self._row_s * rows > URGENT_CLAIM_WAIT_S

    def _more_urgent_waiting(self, rank: int) -> bool:
        if self._urgent_waiting is None:
            return False
        try:
            return self._urgent_waiting(rank)
        except Exception as e:  # the job store is unreachable: the gate will say so; do not hold the batch for it
            log.debug("urgent-job probe failed for %s: %s", self.name, type(e).__name__)
            return False

    def _await_more_urgent(self, rank: int) -> None:
        """Hold the next batch of class `rank` while a more urgent job is on its way here: at most
        `URGENT_CLAIM_WAIT_S` for it to be claimed here, then at most `URGENT_DECODE_WAIT_S` for it to decode."""
        started_s = time.monotonic()
        while not self._stopped and not any(item.priority < rank for item in self._items):
            decoding = any(count > 0 for arriving_rank, count in self._arriving.items() if arriving_rank < rank)
            deadline_s = started_s + (URGENT_DECODE_WAIT_S if decoding else URGENT_CLAIM_WAIT_S)
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                return
            self._cond.wait(timeout=remaining_s)

    def _take_first(self) -> _Item:
        # Most urgent, then earliest deadline, then oldest: a list scan is fine for the few dozen jobs a process holds.
        best = min(range(len(self._items)), key=lambda i: self._items[i].order)
        return self._items.pop(best)

    def _fill(self, first: _Item) -> list[_Item]:
        """`first` and, in order (most urgent, earliest deadline, oldest), each waiting job of its priority that still
        fits: one sorted pass, as a bulk chunk brings a hundred jobs at once."""
        batch, rows, cap = [first], len(first.rows), self.row_cap()
        for item in sorted(self._items, key=lambda waiting: waiting.order):
            if rows >= cap:
                break
            if not item.isolate and item.priority == first.priority and rows + len(item.rows) <= cap:
                batch.append(item)
                rows += len(item.rows)
        taken = {id(item) for item in batch}
        self._items = [item for item in self._items if id(item) not in taken]
        return batch

    def _run(self, batch: list[_Item]) -> None:
        """Gate and compute `batch` on the compute thread, where there is one. Gating there too keeps a job from
        being marked computing while it waits behind another model's pass: should that pass kill the process, the
        job would be blamed for it."""
        if self._compute_thread is None:
            self._run_here(batch)
        else:
            self._compute_thread.submit(self._run_here, batch).result()

    def _run_here(self, batch: list[_Item]) -> None:
        try:
            owned = self._gate([(item.job_id, item.token) for item in batch])
        except Exception as e:  # the job store is unreachable: every attempt fails over to its retry path
            for item in batch:
                item.future.set_exception(e)
            return
        live = []
        for item, ok in zip(batch, owned, strict=True):
            if ok:
                live.append(item)
            else:
                item.future.set_exception(Fenced(f"job {item.job_id} no longer belongs to this attempt"))
        if live:
            self._compute(live)

    def _compute(self, batch: list[_Item]) -> None:
        rows = np.concatenate([item.rows for item in batch])
        try:
            outputs, elapsed_s, lent = self._pass(rows, len(batch))
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            # One bad input must fail only its own job: run each alone to find it.
            log.info(
                "batch of %d for %s failed (%s); running its jobs one by one", len(batch), self.name, type(e).__name__
            )
            for item in batch:
                self._compute([item])
            return
        self._record(len(batch))
        if not lent:  # the per-row estimate is of the node's own cores: what a batch costs under load
            self._observe(rows=len(outputs), seconds=elapsed_s)
        record_batch(self.name, jobs=len(batch), seconds=elapsed_s)
        start = 0
        for item in batch:
            stop = start + len(item.rows)
            item.future.set_result(BatchOutput(rows=outputs[start:stop], batch_jobs=len(batch)))
            start = stop

    def _pass(self, rows: np.ndarray, jobs: int) -> tuple[np.ndarray, float, bool]:
        """One forward pass on this node's cores (borrowing idle neighbours' where worth it): the outputs, the
        seconds it took, and whether cores were borrowed."""
        with self._computing(jobs=jobs, rows=len(rows)) as lent:
            started_s = time.monotonic()
            outputs = self._run_batch(rows)
            return outputs, time.monotonic() - started_s, lent

    @contextlib.contextmanager
    def _computing(self, *, jobs: int, rows: int) -> Iterator[bool]:
        """This node's cores for one pass (and idle neighbours' where worth it: workers.core_share); yields whether
        any were borrowed."""
        if self._cores is None:
            yield False
            return
        expected_s = self._row_s * rows if self._row_s is not None else None
        with self._cores.computing(jobs=jobs, expected_s=expected_s) as lent:
            yield lent

    def _observe(self, *, rows: int, seconds: float) -> None:
        per_row_s = seconds / max(1, rows)
        previous = self._row_s
        self._row_s = per_row_s if previous is None else previous + _ROW_S_SMOOTHING * (per_row_s - previous)

    def _record(self, jobs: int) -> None:
        self.batches_run.append(jobs)
        del self.batches_run[:-100]
