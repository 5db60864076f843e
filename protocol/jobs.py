"""The job record: the source of truth for a job's state, kept in Redis next to the broker.

Celery's own state (the message, the result backend) can lose or repeat a job; the record cannot be moved
backwards: every transition is a Lua script that checks the current state first, and all timestamps come from
the Redis server's clock so that hosts with drifting clocks agree.

    queued ──claim──> running ──finish──> succeeded | failed
      │  └──claim after queued_ttl_s──> expired
      └──cancel──> cancelled
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from protocol.errors import JobNotCancellable, UnknownJob
from protocol.keys import blob_key, idempotency_key, job_key


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def new_job_id() -> str:
    return uuid.uuid4().hex


def _iso(epoch_s: str | None) -> str | None:
    if not epoch_s:
        return None
    return datetime.fromtimestamp(float(epoch_s), tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_or_none(text: str | None) -> Any:
    return json.loads(text) if text else None


_NOW = "local t = redis.call('TIME') local now = t[1] .. '.' .. string.format('%06d', t[2])"

# KEYS: job, idempotency (or the job key again when there is none). ARGV: job id, queued ttl, keep ttl, fields...
_CREATE = f"""
{_NOW}
if KEYS[2] ~= KEYS[1] then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], 'submitted_at', now, 'expires_at', tonumber(now) + tonumber(ARGV[2]))
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return ARGV[1]
"""

# KEYS: job. ARGV: the error for an expired job, keep ttl. A running job claimed again was redelivered.
_CLAIM = f"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
{_NOW}
if status == 'queued' and tonumber(now) > tonumber(redis.call('HGET', KEYS[1], 'expires_at')) then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'finished_at', now, 'error', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  local ref = redis.call('HGET', KEYS[1], 'blob_ref')
  if ref then redis.call('DEL', '{blob_key("")}' .. ref) end
  return 'expired'
end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', now)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  return 'claimed'
end
return status
"""

# KEYS: job, blob. ARGV: from-status, to-status, result json, error json, keep ttl.
_FINISH = f"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= ARGV[1] then return status end
{_NOW}
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', now, 'result', ARGV[3], 'error', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
-- The upload (a DICOM carries the patient's name in its header) is kept no longer than the job needs it.
redis.call('DEL', KEYS[2])
return 'ok'
"""


class JobStore:
    """Job records in Redis. `redis_client` must decode responses to `str`."""

    def __init__(self, redis_client: redis.Redis, *, queued_ttl_s: int, result_ttl_s: int) -> None:
        self._redis = redis_client
        self._queued_ttl_s = queued_ttl_s
        # A record outlives its queue expiry, so a client can still read `expired` for a full result TTL.
        self._keep_ttl_s = queued_ttl_s + result_ttl_s
        self._result_ttl_s = result_ttl_s
        self._create = redis_client.register_script(_CREATE)
        self._claim = redis_client.register_script(_CLAIM)
        self._finish = redis_client.register_script(_FINISH)

    def create(self, job_id: str, fields: dict[str, str], *, idempotency: str | None = None) -> str:
        """Store a queued job; returns its id, or the id of the job already stored under the idempotency key."""
        model = fields["model"]
        idem = idempotency_key(model, idempotency) if idempotency else job_key(job_id)
        flat: list[str] = []
        for name, value in {**fields, "status": JobStatus.QUEUED.value, "attempts": "0"}.items():
            flat += [name, value]
        keys = [job_key(job_id), idem]
        return str(self._create(keys=keys, args=[job_id, self._queued_ttl_s, self._keep_ttl_s, *flat]))

    def fields(self, job_id: str) -> dict[str, str]:
        stored: dict[str, str] = self._redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not stored:
            raise UnknownJob(f"no job with id {job_id!r}")
        return stored

    def view(self, job_id: str) -> dict[str, Any]:
        """The job as clients see it."""
        f = self.fields(job_id)
        return {
            "job_id": job_id,
            "model": f.get("model"),
            "model_version": f.get("model_version"),
            "status": f.get("status"),
            "submitted_at": _iso(f.get("submitted_at")),
            "started_at": _iso(f.get("started_at")),
            "finished_at": _iso(f.get("finished_at")),
            "attempts": int(f.get("attempts", "0")),
            "result": _json_or_none(f.get("result")),
            "error": _json_or_none(f.get("error")),
        }

    def claim(self, job_id: str, expired_error: dict[str, Any]) -> str:
        """Move a job to `running`; returns 'claimed', or why not: its final status, or 'missing'."""
        return str(self._claim(keys=[job_key(job_id)], args=[json.dumps(expired_error), self._result_ttl_s]))

    def succeed(self, job_id: str, blob_ref: str, result: dict[str, Any]) -> str:
        return self._transition(job_id, blob_ref, JobStatus.RUNNING, JobStatus.SUCCEEDED, result=result)

    def fail(self, job_id: str, blob_ref: str, error: dict[str, Any]) -> str:
        return self._transition(job_id, blob_ref, JobStatus.RUNNING, JobStatus.FAILED, error=error)

    def fail_unsent(self, job_id: str, blob_ref: str, error: dict[str, Any]) -> str:
        """A job whose message never reached the broker fails at once instead of waiting to expire."""
        return self._transition(job_id, blob_ref, JobStatus.QUEUED, JobStatus.FAILED, error=error)

    def cancel(self, job_id: str) -> None:
        """Cancel a queued job; cancelling a cancelled job again is a no-op."""
        blob_ref = self.fields(job_id).get("blob_ref", "")
        outcome = self._transition(job_id, blob_ref, JobStatus.QUEUED, JobStatus.CANCELLED)
        if outcome not in ("ok", JobStatus.CANCELLED.value):
            raise JobNotCancellable(f"job {job_id} is {outcome}; only a queued job can be cancelled")

    def _transition(
        self,
        job_id: str,
        blob_ref: str,
        source: JobStatus,
        target: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> str:
        keys = [job_key(job_id), blob_key(blob_ref)]
        payloads = [json.dumps(result) if result is not None else "", json.dumps(error) if error is not None else ""]
        args = [source.value, target.value, *payloads, self._result_ttl_s]
        return str(self._finish(keys=keys, args=args))
