"""The reconciler: the time-based half of the job state machine, so that no job waits on a broker's timeout.

Each pass, under a short Redis lock (run as many reconcilers as you like; one works at a time):
- queued jobs past their queue deadline end `expired`, without costing compute;
- running jobs whose lease lapsed (their worker died or was cut off) go back to the queue after a backoff, or end
  `failed` and dead-lettered once their attempts are used up;
- jobs whose backoff has ended are published again;
- callbacks whose message was lost are handed out again;
- every `lost_message_check_s`, queued jobs whose message is in no broker list (the API died between record and
  publish, or Redis lost the publish in its fsync window) are published again, and waiting-set entries whose record
  is gone (no reconciler ran for the record's whole keep time, or Redis evicted it) are removed, so that they do not
  inflate the queue depth that backpressure reads.
A message published twice is harmless: a claim hands the job to one attempt only.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter

import redis
from celery import Celery

from inferq.config import Settings
from inferq.protocol.celery_config import entry_queue, entry_task, message_job_ids, model_queue_names
from inferq.protocol.connections import Stores
from inferq.protocol.fairness import publish_options
from inferq.protocol.jobs import JobStore
from inferq.protocol.keys import (
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    KOMBU_UNACKED_HASH,
    KOMBU_UNACKED_INDEX,
    job_key,
    leases_key,
    model_waiting_key,
    published_key,
    queue_lists,
    queued_key,
    reconciler_lock_key,
    retries_key,
    task_name_for,
    tenant_waiting_key,
    urgent_waiting_key,
)
from inferq.protocol.priority import stored_priority
from inferq.protocol.registry import Registry

log = logging.getLogger(__name__)

_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_BATCH = 500
_RETRY_BACKOFF_S = 1.0
_SCAN_COUNT = 1000


class Reconciler:
    """One pass at a time with `tick`; `run` loops until `stop` is set."""

    def __init__(self, settings: Settings, registry: Registry, stores: Stores, celery_app: Celery) -> None:
        self._settings = settings
        self._registry = registry
        self._stores = stores
        self._celery = celery_app
        self._token = uuid.uuid4().hex
        self._unlock = stores.text.register_script(_UNLOCK)
        self._last_lost_check_s = 0.0
        self._tenant_scan_cursor = 0

    @property
    def _jobs(self) -> JobStore:
        return self._stores.jobs

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                counts = self.tick()
                if counts:
                    log.info("reconciled: %s", dict(counts))
            except redis.RedisError as e:
                log.warning("reconciler pass failed: %s; trying again", type(e).__name__)
            stop.wait(self._settings.reconcile_interval_s)

    def tick(self, *, check_lost: bool | None = None) -> Counter[str]:
        """One pass; counts what it did. Skipped (empty) while another reconciler holds the lock."""
        lock_ms = int(max(10.0, 5 * self._settings.reconcile_interval_s) * 1000)
        if not self._stores.text.set(reconciler_lock_key(), self._token, nx=True, px=lock_ms):
            return Counter()
        try:
            counts: Counter[str] = Counter()
            counts.update(self._expire_due())
            counts.update(self._recover_lapsed())
            counts.update(self._publish_due_retries())
            counts.update(self._hand_out_callbacks())
            now_s = time.monotonic()
            due = now_s - self._last_lost_check_s >= self._settings.lost_message_check_s / 2
            if check_lost if check_lost is not None else due:
                self._last_lost_check_s = now_s
                counts.update(self._republish_lost())
                counts.update(self._sweep_waiting_sets())
            return +counts
        finally:
            self._unlock(keys=[reconciler_lock_key()], args=[self._token])

    def _expire_due(self) -> Counter[str]:
        return Counter(self._jobs.expire(job_id) for job_id in self._jobs.due(queued_key(), limit=_BATCH))

    def _recover_lapsed(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for job_id in self._jobs.due(leases_key(), limit=_BATCH):
            outcome = self._jobs.recover(job_id, backoff_s=_RETRY_BACKOFF_S)
            counts[f"lease_{outcome}"] += 1
            if outcome == "dead":
                log.warning(
                    "job %s dead-lettered: its attempts kept losing their worker", job_id, extra={"job_id": job_id}
                )
                self._maybe_callback(job_id)
        return counts

    def _publish_due_retries(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for job_id in self._jobs.due(retries_key(), limit=_BATCH):
            if self._jobs.take_retry(job_id) and self.publish(job_id):
                counts["retried"] += 1
        return counts

    def _hand_out_callbacks(self) -> Counter[str]:
        job_ids = self._jobs.due_callbacks()
        for job_id in job_ids:
            self._celery.send_task(CALLBACK_TASK, args=[job_id], queue=CALLBACK_QUEUE)
        return Counter({"callbacks": len(job_ids)}) if job_ids else Counter()

    def _maybe_callback(self, job_id: str) -> None:
        if self._stores.text.hget(job_key(job_id), "callback_url"):
            self._celery.send_task(CALLBACK_TASK, args=[job_id], queue=CALLBACK_QUEUE)

    def _republish_lost(self) -> Counter[str]:
        cutoff_s = self._jobs.server_time_s() - self._settings.lost_message_check_s
        old: list[str] = self._stores.text.zrangebyscore(published_key(), "-inf", cutoff_s, start=0, num=10 * _BATCH)  # type: ignore[assignment]
        if not old:
            return Counter()
        in_broker = self._ids_in_broker()
        counts: Counter[str] = Counter()
        for job_id in old:
            if job_id not in in_broker and self._still_waiting(job_id, cutoff_s) and self.publish(job_id):
                log.warning("job %s: its message was lost; published again", job_id, extra={"job_id": job_id})
                counts["lost_republished"] += 1
        return counts

    def _sweep_waiting_sets(self) -> Counter[str]:
        """Drop waiting-set entries whose record is gone (see `SWEEP_WAITING`): every model's sets, and the next
        stretch of tenants' sets (a SCAN step per pass, resumed where the last pass stopped)."""
        keys = [key for model in self._registry for key in (model_waiting_key(model), urgent_waiting_key(model))]
        cursor, found = self._stores.text.scan(
            self._tenant_scan_cursor, match=tenant_waiting_key("*", "*"), count=_SCAN_COUNT
        )
        self._tenant_scan_cursor = int(cursor)
        tenant_keys = [str(key) for key in found]
        removed = self._jobs.sweep_waiting([*keys, *tenant_keys])
        if removed:
            log.warning("removed %d waiting-set entries whose job record is gone", removed)
        return Counter({"ghosts_removed": removed}) if removed else Counter()

    def _still_waiting(self, job_id: str, cutoff_s: float) -> bool:
        status = self._stores.text.hget(job_key(job_id), "status")
        score = self._stores.text.zscore(published_key(), job_id)
        return status == "queued" and score is not None and float(score) <= cutoff_s

    def _ids_in_broker(self) -> set[str]:
        """Task ids of every message waiting in a model queue, or delivered to a worker within the check period."""
        text = self._stores.text
        pipe = text.pipeline(transaction=False)
        buckets = self._settings.tenant_buckets
        for queue in model_queue_names(self._registry):
            for name in queue_lists(queue, buckets=buckets):
                pipe.lrange(name, 0, -1)
        pipe.hgetall(KOMBU_UNACKED_HASH)
        # A worker starts a job the moment it receives it; a message delivered longer ago whose job is still queued
        # sits with a worker that died or was cut off, and comes back only after the visibility timeout (hours).
        pipe.zrangebyscore(KOMBU_UNACKED_INDEX, time.time() - self._settings.lost_message_check_s, "+inf")
        *lists, unacked, recent = pipe.execute()
        ids = {job_id for messages in lists for raw in messages for job_id in message_job_ids(raw)}
        ids |= {job_id for tag in recent if tag in unacked for job_id in message_job_ids(unacked[tag], envelope=True)}
        return ids

    def publish(self, job_id: str) -> bool:
        """Send a job's task again, to the stage it is at (and its tenant's sub-queue, at its priority); False if it
        is no longer queued or its model is unknown."""
        fields = ["model", "blob_ref", "status", "tensor_ref", "tenant", "priority", "expires_at"]
        model, blob_ref, status, tensor_ref, tenant, priority, expires_at = self._stores.text.hmget(
            job_key(job_id), fields
        )
        if status != "queued" or not isinstance(model, str) or model not in self._registry:
            return False
        # Marked first: should the send fail, the lost-message check publishes it later.
        self._jobs.mark_published([job_id])
        spec = self._registry[model]
        queue = spec.queue_name if tensor_ref else entry_queue(spec)
        routing = publish_options(
            self._settings,
            queue,
            tenant=str(tenant or ""),
            priority=stored_priority(str(priority or "")),
            remaining_s=float(expires_at or "inf") - self._jobs.server_time_s(),
        )
        if tensor_ref:  # decoded already: only the model's stage is left
            self._celery.send_task(
                task_name_for(model), args=[job_id, tensor_ref], kwargs={"prepared": True}, task_id=job_id, **routing
            )
        else:
            self._celery.send_task(entry_task(spec), args=[job_id, blob_ref], task_id=job_id, **routing)
        return True
