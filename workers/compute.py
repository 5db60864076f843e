"""The one thread of a worker process that runs torch: model loads, warm-ups and every forward pass, of every model.

Why one thread: the CPU build's intra-op threads are OpenMP's, and each thread that runs torch keeps its own team of
OpenMP threads; teams in one process slow each other down even when they take turns. Measured on 2 cores with
DenseNet-121 and one image per pass:

- 66 ms: the pass runs in the thread that set 2 torch threads, and no other thread ran torch with more than one;
- 150-175 ms: the main thread had set 2 threads and loaded the model, then another thread ran the passes (how a
  node with 2 torch threads computed before), or two threads with 2 torch threads each took turns (two models);
- 111 ms: a 2-thread pass taking turns with a 1-thread pass in another thread.

So the main thread is set to one torch thread and does no torch work, and the passes of a node's models (one batcher
thread per model) queue for this thread, as they would queue for the same cores anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ComputeThread:
    """Runs callables one at a time on a thread whose torch uses `threads` intra-op threads."""

    def __init__(self, threads: int) -> None:
        # The calling (main) thread's own setting: left at the default (every CPU), its first torch op would start a
        # team of that many threads, which would slow this thread's passes for the life of the process.
        torch.set_num_threads(1)
        # torch settles a thread's count at its first use from the process-wide value, which the compute thread
        # raises: reading it here settles this thread's at one for good.
        torch.get_num_threads()
        self.threads = threads
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch", initializer=torch.set_num_threads, initargs=(threads,)
        )

    @property
    def executor(self) -> Executor:
        return self._executor

    def run(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` on the compute thread, after whatever is queued there; its result or its exception."""
        return self._executor.submit(work, *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
