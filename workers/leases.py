"""The leases a worker process holds, kept alive by one thread, which also enforces the time limits.

Every job this process has claimed is renewed here in one pipelined round trip every `lease_s / 4`. If the process
dies, renewal stops and the reconciler finds the lapsed leases: that, not the broker's visibility timeout, decides
how fast a dead worker's jobs run again.

Time limits: a thread cannot be interrupted inside a forward pass, so the soft limit fails the job with `timeout`
from here (its attempt is then fenced off and whatever it computes later is dropped), and the hard limit ends the
whole process, as Celery's prefork pool does to a child: the jobs it still held run again elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from inferq.protocol.errors import TimeLimitExceeded
from inferq.protocol.jobs import JobStatus, JobStore, Outcome
from inferq.protocol.keys import consumers_key, worker_slots_key

log = logging.getLogger(__name__)

# Exit status of a worker process ended by the hard time limit (EX_SOFTWARE): its supervisor starts another.
HARD_LIMIT_EXIT_STATUS = 70
# Time limits are checked this often, so a limit is kept to within half a second.
_LIMIT_CHECK_S = 0.5
# The slots record outlives a few missed heartbeats; capacity counts only nodes whose heartbeat is fresh anyway.
_SLOTS_TTL_S = 60


@dataclass
class _Held:
    token: int
    model: str
    soft_limit_s: float
    hard_limit_s: float
    since_s: float
    timed_out: bool = False


class LeaseKeeper:
    """Renews this process's leases, heartbeats its queues, and applies the time limits."""

    def __init__(
        self,
        jobs: JobStore,
        *,
        node: str,
        queues: list[str],
        lease_s: float,
        on_timeout: Callable[[str], None] | None = None,
        exit_process: Callable[[int], None] = os._exit,
        slots: int = 0,
    ) -> None:
        self._jobs = jobs
        self._slots = slots
        self._node = node
        self._queues = queues
        self.lease_s = lease_s
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_timeout = on_timeout
        self._exit_process = exit_process
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._heartbeat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease_s)
        try:
            pipe = self._jobs.redis.pipeline(transaction=False)
            for queue in self._queues:
                pipe.zrem(consumers_key(queue), self._node)
            pipe.delete(worker_slots_key(self._node))
            pipe.execute()
        except Exception as e:  # leaving: the heartbeat simply ages out
            log.info("could not remove the heartbeat of %s: %s", self._node, type(e).__name__)

    def hold(self, job_id: str, token: int, model: str, *, soft_limit_s: float, hard_limit_s: float) -> None:
        with self._lock:
            self._held[job_id] = _Held(token, model, soft_limit_s, hard_limit_s, time.monotonic())

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _loop(self) -> None:
        renew_every_s = max(0.2, self.lease_s / 4)
        next_renewal_s = time.monotonic() + renew_every_s
        while not self._stop.wait(_LIMIT_CHECK_S):
            try:
                self._enforce_limits()
                if time.monotonic() >= next_renewal_s:
                    next_renewal_s = time.monotonic() + renew_every_s
                    self._renew()
                    self._heartbeat()
            except Exception as e:  # Redis away: keep trying; the leases lapse if it stays away too long
                log.warning("lease renewal failed: %s", type(e).__name__)

    def _renew(self) -> None:
        with self._lock:
            leases = [(job_id, held.token) for job_id, held in self._held.items() if not held.timed_out]
        if leases:
            self._jobs.renew(leases, lease_s=self.lease_s)

    def _heartbeat(self) -> None:
        now_s = self._jobs.server_time_s()
        pipe = self._jobs.redis.pipeline(transaction=False)
        for queue in self._queues:
            pipe.zadd(consumers_key(queue), {self._node: now_s})
        if self._slots:
            pipe.set(worker_slots_key(self._node), self._slots, ex=_SLOTS_TTL_S)
        pipe.execute()

    def _enforce_limits(self) -> None:
        now_s = time.monotonic()
        with self._lock:
            soft = [(j, h) for j, h in self._held.items() if not h.timed_out and now_s - h.since_s > h.soft_limit_s]
            hard = [j for j, h in self._held.items() if now_s - h.since_s > h.hard_limit_s]
            for _, held in soft:
                held.timed_out = True
        if soft:
            self._fail_timed_out(soft)
        if hard:
            log.error("jobs %s ran past their hard time limit; ending this worker process", ", ".join(hard))
            self._exit_process(HARD_LIMIT_EXIT_STATUS)

    def _fail_timed_out(self, timed_out: list[tuple[str, _Held]]) -> None:
        outcomes = []
        for job_id, held in timed_out:
            error = TimeLimitExceeded(f"the job ran past its model's time limit of {held.soft_limit_s:g} s").to_dict()
            outcomes.append(Outcome(job_id, held.token, JobStatus.FAILED, error=error))
        for (job_id, held), reply in zip(timed_out, self._jobs.finish(outcomes), strict=True):
            log.warning("job %s failed: timeout", job_id, extra={"job_id": job_id, "model": held.model})
            if reply == "ok:callback" and self._on_timeout is not None:
                self._on_timeout(job_id)
