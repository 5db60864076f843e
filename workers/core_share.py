"""Idle cores lent between the CPU nodes of one `inferq worker`: a lone job computes on every core, a busy host on one
per node.

Under load, one single-threaded node per CPU is the fastest layout (two single-thread processes beat one two-thread
process by 20-55% on a 2-core host). At low load it leaves a lone job on one core while the others idle: DenseNet-121
takes 82 ms on one thread here and 54 ms on two. So a node about to run a long forward pass borrows the cores of
neighbours that hold no job, and gives them back when the pass ends.

Two OpenMP teams on the same cores spin against each other (measured: a two-thread pass beside a one-thread one took
199 ms instead of 54), so a core is only ever lent under a lock. Each node owns a lock file:
- while a node computes, it holds its own lock shared (every batcher thread of the node may compute at once);
- a borrower holds a neighbour's lock exclusively for one pass, so the neighbour, if a job arrives meanwhile, waits
  at most that pass before it computes (it decodes in the meantime);
- a borrower takes a neighbour's core only while the neighbour holds no job (its flag in a shared page, kept by the
  node from claim to outcome) and only while the borrower itself holds no job besides the batch: anything left to
  decode on either side would share the cores with the borrowed pass.
The locks are `flock`s: the kernel releases them with a process that dies, so a crashed borrower never keeps a core.
A node that restarts clears its own flag; a stale flag only means its core is not lent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# A pass shorter than this gains less from more threads than their start-up costs (a fraud batch: 0.2 ms).
LEND_MIN_S = 0.02
# A node whose core is lent waits this long at most for it: a borrower that is stopped (SIGSTOP, a debugger) or hung
# must not stall its neighbour's jobs. Past it the node computes anyway, sharing the core for once.
RECLAIM_WAIT_S = 2.0
_RECLAIM_POLL_S = 0.002
_FLAGS = "busy"


def create_share(nodes: int, parent: Path | None = None) -> Path:
    """The folder the nodes of one `inferq worker` share: a lock file per node and the page of busy flags."""
    folder = Path(tempfile.mkdtemp(prefix="inferq-cores-", dir=parent))
    (folder / _FLAGS).write_bytes(bytes(nodes))
    for index in range(nodes):
        (folder / _lock_name(index)).touch()
    return folder


def _lock_name(index: int) -> str:
    return f"core-{index}.lock"


class CoreShare:
    """One node's side of the share: its busy flag, its lock, and its neighbours' cores to borrow.

    `threads` is the node's own torch thread count; `set_threads` sets the calling thread's (torch.set_num_threads
    acts per thread for OpenMP, and `computing` runs on the node's compute thread: workers.compute)."""

    def __init__(
        self, folder: Path, *, index: int, threads: int, max_threads: int, set_threads: Callable[[int], None]
    ) -> None:
        self._folder = folder
        self._index = index
        self._threads = threads
        self._max_threads = max_threads
        self._set_threads = set_threads
        self._current_threads = threads  # the compute thread starts at the node's own count (workers.compute)
        with (folder / _FLAGS).open("r+b") as file:
            self._flags = mmap.mmap(file.fileno(), 0)
        self._nodes = len(self._flags)
        if not 0 <= index < self._nodes:
            raise ValueError(f"node index {index} is outside the share's {self._nodes} nodes")
        self._held = 0
        self._held_lock = threading.Lock()
        self._local = threading.local()  # per thread: its own open lock files (flock is per open file)
        self._flags[index] = 0  # a restarted node's flag may be left set by the one before it

    # --- the jobs this node holds, from claim to outcome

    def hold(self, jobs: int) -> None:
        with self._held_lock:
            self._held += jobs
            self._flags[self._index] = 1 if self._held > 0 else 0

    def release(self, jobs: int) -> None:
        with self._held_lock:
            self._held = max(0, self._held - jobs)
            self._flags[self._index] = 1 if self._held > 0 else 0

    # --- a forward pass

    @contextlib.contextmanager
    def computing(self, *, jobs: int, expected_s: float | None) -> Iterator[bool]:
        """Hold this node's cores (waiting while a neighbour borrows them) and, where the pass is worth it and
        nothing else waits on either side, idle neighbours' cores; yields whether any were borrowed."""
        own = self._lock_file(self._index)
        self._reclaim(own)
        worth_it = expected_s is not None and expected_s >= LEND_MIN_S and self._only_the_batch(jobs)
        borrowed = self._borrow() if worth_it else []
        self._use_threads(min(self._max_threads, self._threads * (1 + len(borrowed))))
        try:
            yield bool(borrowed)
        finally:
            for fd in [*borrowed, own]:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _use_threads(self, threads: int) -> None:
        """Set the thread count for a pass only where it differs from the last pass's: changing it costs (about
        10 ms a pass for DenseNet-121 on 2 cores, set up and back), and lone jobs one after another all borrow. A
        node idle between passes runs no thread, whatever its count; every pass sets the count it may use."""
        if threads != self._current_threads:
            self._set_threads(threads)
            self._current_threads = threads

    def _reclaim(self, own: int) -> None:
        """Hold this node's own lock shared, waiting while a neighbour borrows the core (at most RECLAIM_WAIT_S)."""
        deadline_s = time.monotonic() + RECLAIM_WAIT_S
        while True:
            try:
                fcntl.flock(own, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline_s:
                    log.warning(
                        "node %d: a neighbour kept its borrowed core past %.0f s; computing anyway",
                        self._index,
                        RECLAIM_WAIT_S,
                    )
                    return
                time.sleep(_RECLAIM_POLL_S)

    def busy_flags(self) -> list[bool]:
        return [bool(self._flags[index]) for index in range(self._nodes)]

    def _only_the_batch(self, jobs: int) -> bool:
        with self._held_lock:
            return self._held <= jobs

    def _borrow(self) -> list[int]:
        borrowed = []
        for index in range(self._nodes):
            if index == self._index or self._flags[index]:
                continue
            fd = self._lock_file(index)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the neighbour computes, or another node borrows it
                continue
            if self._flags[index]:  # a job reached it between the look and the lock: it keeps its core
                fcntl.flock(fd, fcntl.LOCK_UN)
                continue
            borrowed.append(fd)
            if self._threads * (1 + len(borrowed)) >= self._max_threads:
                break
        return borrowed

    def _lock_file(self, index: int) -> int:
        files: dict[int, int] | None = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        if index not in files:
            files[index] = os.open(self._folder / _lock_name(index), os.O_RDWR)
        return files[index]
