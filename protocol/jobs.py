"""The job record: the source of truth for a job's state, kept in Redis next to the broker.

Celery's message can be lost, repeated or held by a dead worker; the record cannot be moved backwards: every
transition is a Lua script (`protocol.job_scripts`) that checks the current state first, and all timestamps come
from the Redis server's clock so that hosts with drifting clocks agree.

    queued ──claim──> running ──finish──> succeeded | failed
      │   ^              │ └──lease lapsed / transient error──> queued again (backoff), or failed + dead letter
      │   └──────────────┘
      ├──queue deadline──> expired
      └──cancel (also while claimed, before its forward pass starts)──> cancelled

A running attempt holds a lease that its worker renews; `attempts` is the fencing token that lets only the current
attempt write the outcome. The reconciler (`producers.reconciler`) drives the time-based transitions.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from redis.exceptions import NoScriptError

from inferq.protocol import job_scripts
from inferq.protocol.errors import JobNotCancellable, UnknownJob
from inferq.protocol.keys import (
    blob_key,
    callbacks_key,
    dead_letter_key,
    idempotency_key,
    job_key,
    leases_key,
    model_waiting_key,
    published_key,
    retries_key,
    tenant_jobs_key,
    tenant_waiting_key,
    urgent_waiting_key,
)


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


FINAL_STATUSES = frozenset(s.value for s in JobStatus if s.is_final)
EXPIRED_ERROR = {"code": "expired", "message": "the job was not started before its queue deadline", "retryable": False}
CANCELLED_ERROR = {"code": "cancelled", "message": "the job was cancelled before it ran", "retryable": False}
# A callback is handed to its queue at once; if that message is lost the reconciler hands it out after this.
CALLBACK_GRACE_S = 30


def new_job_id() -> str:
    return uuid.uuid4().hex


# What `create_many` stores in place of an id for a job refused because its model's queue was full.
QUEUE_FULL = job_scripts.QUEUE_FULL
# Jobs per call of a script's many-jobs form: a call holds Redis for about 3 ms.
_MANY_PER_CALL = 100


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


@functools.lru_cache(maxsize=1024)  # the jobs moved by one script call share their timestamps (a bulk's hundreds)
def _iso(epoch_s: str | None) -> str | None:
    if not epoch_s:
        return None
    return datetime.fromtimestamp(float(epoch_s), tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_or_none(text: str | None) -> Any:
    return json.loads(text) if text else None


@dataclass(frozen=True)
class Claim:
    """What a claim got: `outcome` is 'claimed' (then `token` fences this attempt), 'leased', a final status or
    'missing'. `lost` is non-zero for a job that may have ended a worker process before (its forward pass was
    running when one died): such a job runs alone."""

    outcome: str
    token: int = 0
    lost: int = 0
    queued_s: float = 0.0  # how long the job waited between submission and this claim (server clock)
    # Of a claimed job: its priority class and queue deadline (epoch seconds), for the batcher's order, and its
    # tenant, for the sub-queue of the next stage (protocol.fairness).
    priority: str = ""
    expires_at_s: float = float("inf")
    tenant: str = ""
    # The queue deadline the client asked for (`deadline_s` at submission), else infinity: the batcher orders by it.
    deadline_at_s: float = float("inf")

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


@dataclass(frozen=True)
class NewJob:
    """One job of `JobStore.create_many`: its record fields, idempotency key, blob (stored under
    `fields['blob_ref']`) and its own queue deadline in seconds (None: `queued_ttl_s`)."""

    job_id: str
    fields: dict[str, str]
    idempotency: str | None = None
    blob: bytes | None = None
    queue_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, to be written by `JobStore.finish` if the attempt still owns its job."""

    job_id: str
    token: int
    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    batch_size: int = 0


class JobStore:
    """Job records in Redis. `redis_client` must decode responses to `str`."""

    def __init__(self, redis_client: redis.Redis, *, queued_ttl_s: int, result_ttl_s: int) -> None:
        self._redis = redis_client
        self.queued_ttl_s = queued_ttl_s
        # A record outlives its queue expiry, so a client can still read `expired` for a full result TTL.
        self.keep_ttl_s = queued_ttl_s + result_ttl_s
        self.result_ttl_s = result_ttl_s
        # BEGIN, RENEW and FINISH run only in their many-jobs form (batches, leases and outcomes come in lists);
        # CREATE and CLAIM also alone, for `create` and `claim`.
        self._scripts = {
            name: redis_client.register_script(getattr(job_scripts, name))
            for name in (
                "CREATE", "CLAIM", "RELEASE", "RECOVER", "CANCEL", "EXPIRE", "REQUEUE_DEAD", "CALLBACK_TAKE",
                "CALLBACK_DONE", "DISCARD", "HANDOFF", "URGENT_WAITING", "SWEEP_WAITING",
                "CREATE_MANY", "CLAIM_MANY", "BEGIN_MANY", "RENEW_MANY", "FINISH_MANY",
            )
        }  # fmt: skip

    @property
    def redis(self) -> redis.Redis:
        return self._redis

    def _run(self, name: str, job_id: str, *args: Any, keys: list[str] | None = None, client: Any = None) -> Any:
        """Run a script now, or queue it on the pipeline `client` by its hash: a pipeline then needs no SCRIPT
        EXISTS round trip first, and `execute` loads the scripts should Redis have lost them (a restart)."""
        script, keys = self._scripts[name], keys or [job_key(job_id)]
        if client is None:
            return script(keys=keys, args=[job_id, *args])
        return client.evalsha(script.sha, len(keys), *keys, job_id, *args)

    def _run_many(self, name: str, calls: Sequence[tuple[list[str], list[Any]]], *, client: Any) -> int:
        """Queue the script `name`'s many-jobs form (job_scripts._many) on the pipeline `client` for `calls`, each
        a job's keys and arguments (its id first), `_MANY_PER_CALL` jobs per call so that none holds Redis for
        long; returns how many calls were queued. `replies_of` flattens their replies."""
        script, queued = self._scripts[f"{name}_MANY"], 0
        for start in range(0, len(calls), _MANY_PER_CALL):
            chunk = calls[start : start + _MANY_PER_CALL]
            keys = [key for job_keys, _ in chunk for key in job_keys]
            args: list[Any] = [len(chunk[0][0])]
            for _, job_args in chunk:
                args += [len(job_args), *job_args]
            client.evalsha(script.sha, len(keys), *keys, *args)
            queued += 1
        return queued

    @staticmethod
    def replies_of(many: Sequence[Any]) -> list[Any]:
        """The per-job replies of calls queued by `_run_many`, in order."""
        return [reply for call in many for reply in call]

    def execute(self, pipe: Any) -> list[Any]:
        """Execute a pipeline holding scripts queued by `_run` or `_run_many`; raises the first error reply, as
        `execute()` does. A script Redis had lost runs after the pipeline's other commands: queue none that depends
        on a script."""
        stack = list(pipe.command_stack)
        replies = list(pipe.execute(raise_on_error=False))
        unloaded = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unloaded:  # a script that was not loaded did not run: load them all, then run just those again
            for script in self._scripts.values():
                pipe.script_load(script.script)
            for i in unloaded:
                args, options = stack[i]
                pipe.execute_command(*args, **options)
            again = pipe.execute(raise_on_error=False)[len(self._scripts) :]
            for i, reply in zip(unloaded, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies

    # --- submission

    def create(
        self, job_id: str, fields: dict[str, str], *, idempotency: str | None = None, queue_s: float | None = None
    ) -> str:
        """Store a queued job; returns its id, or the id of the live job already stored under the idempotency key.

        `queue_s` shortens the queue deadline below `queued_ttl_s` (a job's own `deadline_s`)."""
        keys, args = self._create_args(job_id, fields, idempotency, queue_s, max_queue_depth=0)
        return str(self._scripts["CREATE"](keys=keys, args=args))

    def create_many(self, jobs: Sequence[NewJob], *, blob_ttl_s: int, max_queue_depth: int = 0) -> list[str]:
        """Store the blobs and queued records of many jobs in one pipeline, with the same script as `create`;
        returns each job's stored id in order: another job's id where its idempotency key was already used, or
        `QUEUE_FULL` where its model already had `max_queue_depth` jobs waiting (0: no limit)."""
        pipe = self._redis.pipeline(transaction=False)
        with_blobs = [job for job in jobs if job.blob is not None]
        for job in with_blobs:
            pipe.set(blob_key(job.fields["blob_ref"]), job.blob, ex=blob_ttl_s)  # type: ignore[arg-type]
        calls = [self._create_args(j.job_id, j.fields, j.idempotency, j.queue_s, max_queue_depth) for j in jobs]
        self._run_many("CREATE", calls, client=pipe)
        stored = [str(job_id) for job_id in self.replies_of(self.execute(pipe)[len(with_blobs) :])]
        pairs = zip(jobs, stored, strict=True)
        spare = [blob_key(j.fields["blob_ref"]) for j, s in pairs if s != j.job_id and j.blob is not None]
        if spare:  # replayed or refused: their uploads are not needed
            self._redis.delete(*spare)
        return stored

    def _create_args(
        self, job_id: str, fields: dict[str, str], idempotency: str | None, queue_s: float | None, max_queue_depth: int
    ) -> tuple[list[str], list[Any]]:
        idem = idempotency_key(fields["model"], idempotency) if idempotency else job_key(job_id)
        deadline_s = min(self.queued_ttl_s, queue_s) if queue_s else self.queued_ttl_s
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, value]
        keys = [job_key(job_id), idem, model_waiting_key(fields["model"])]
        return keys, [job_id, deadline_s, self.keep_ttl_s, max_queue_depth, *flat]

    def discard_unsent(self, job_id: str, *, model: str, idempotency: str | None) -> str:
        """Remove a job whose message never reached the broker: record, idempotency entry (if still ours) and
        blob, so a retry with the same key makes a fresh job. Returns 'discarded', or the status of a job that a
        worker already took (its message did arrive after all), which is then left alone."""
        idem = idempotency_key(model, idempotency) if idempotency else job_key(job_id)
        return str(self._run("DISCARD", job_id, keys=[job_key(job_id), idem]))

    def mark_published(self, job_ids: list[str]) -> None:
        """Record when jobs' messages were (re)sent, for the reconciler's lost-message check."""
        now_s = self.server_time_s()
        self._redis.zadd(published_key(), dict.fromkeys(job_ids, now_s))

    # --- reading

    def fields(self, job_id: str) -> dict[str, str]:
        stored: dict[str, str] = self._redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not stored:
            raise UnknownJob(f"no job with id {job_id!r}")
        return stored

    def view(self, job_id: str) -> dict[str, Any]:
        """The job as clients see it; a queued job past its deadline reads `expired` even if no worker looked."""
        fields = self.fields(job_id)
        if _past_deadline(fields, self.server_time_s()):
            self.expire(job_id)
            fields = self.fields(job_id)
        return render_view(job_id, fields)

    def views(self, job_ids: Sequence[str], *, tenant: str | None = None) -> list[dict[str, Any] | None]:
        """Many jobs in one round trip; None for an unknown id and, given `tenant`, for another tenant's job (read
        as unknown, so that its existence is not revealed). Expired-on-read like `view`."""
        stored, now_s = self._read_all(job_ids, tenant)
        late = [job_id for job_id, fields in zip(job_ids, stored, strict=True) if _past_deadline(fields, now_s)]
        if late:
            for job_id in late:
                self.expire(job_id)
            stored, _ = self._read_all(job_ids, tenant)
        return [render_view(j, f) if f else None for j, f in zip(job_ids, stored, strict=True)]

    def _read_all(self, job_ids: Sequence[str], tenant: str | None) -> tuple[list[dict[str, str]], float]:
        """The records (empty where unknown or not `tenant`'s), and Redis's clock read in the same round trip (a
        waiting request reads often)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        pipe.time()
        *stored, (seconds, micros) = pipe.execute()
        if tenant is not None:
            stored = [fields if fields.get("tenant") == tenant else {} for fields in stored]
        return stored, float(seconds) + float(micros) / 1e6

    def tenants(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's tenant in one round trip; None for an unknown job."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "tenant")
        return list(pipe.execute())

    def tenant_queue_depths(self, tenant: str, models: Sequence[str]) -> dict[str, int]:
        """Waiting jobs per model, counting only this tenant's: what a tenant may see of the queues."""
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(tenant_waiting_key(tenant, model))
        return {model: int(count) for model, count in zip(models, pipe.execute(), strict=True)}

    def model_queue_depths(self, models: Sequence[str]) -> dict[str, int]:
        """Waiting jobs per model, of every tenant, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(model_waiting_key(model))
        return {model: int(count) for model, count in zip(models, pipe.execute(), strict=True)}

    def oldest_waiting_at(self, models: Sequence[str]) -> dict[str, float | None]:
        """Per model, when its longest-waiting job was submitted (epoch seconds; None: none waits)."""
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.zrange(model_waiting_key(model), 0, 0, withscores=True)
        return {model: (first[0][1] if first else None) for model, first in zip(models, pipe.execute(), strict=True)}

    def more_urgent_waiting(self, model: str, rank: int) -> bool:
        """Whether a job of this model more urgent than class `rank` (protocol.priority: 0 stat) is waiting to be
        claimed now: a worker about to start a batch of class `rank` gives it a moment to arrive."""
        return rank > 0 and self._run("URGENT_WAITING", model, rank, keys=[urgent_waiting_key(model)]) == 1

    def sweep_waiting(self, keys: Sequence[str], *, oldest: int = 100) -> int:
        """Remove from the waiting sets `keys` the entries, among each one's `oldest`, whose job record is gone; how
        many were removed (one round trip)."""
        if not keys:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            self._run("SWEEP_WAITING", str(oldest), keys=[key], client=pipe)
        return sum(int(removed) for removed in self.execute(pipe))

    def tenant_job_ids(self, tenant: str, *, limit: int, before_s: float | None = None) -> list[str]:
        """This tenant's most recent job ids, newest first, submitted before `before_s` (epoch seconds)."""
        newest = f"({before_s}" if before_s is not None else "+inf"
        ids: list[str] = self._redis.zrevrangebyscore(tenant_jobs_key(tenant), newest, "-inf", start=0, num=limit)  # type: ignore[assignment]
        return ids

    def server_time_s(self) -> float:
        seconds, micros = self._redis.time()
        return float(seconds) + float(micros) / 1e6

    # --- the attempt

    def claim(self, job_id: str, *, node: str, pid: int, lease_s: float, client: Any = None) -> Any:
        """Start an attempt; `claim_result` reads the reply (split so that a pipeline can also fetch the blob)."""
        args = [node, pid, lease_s, json.dumps(EXPIRED_ERROR), self.keep_ttl_s, CALLBACK_GRACE_S]
        return self._run("CLAIM", job_id, *args, client=client)

    def claim_all(self, job_ids: Sequence[str], *, node: str, pid: int, lease_s: float, client: Any) -> int:
        """`claim` for many jobs, queued on the pipeline `client` in as few script calls as fit; returns how many
        replies that adds, which `replies_of` turns into one `claim_result` reply per job."""
        shared = [node, pid, lease_s, json.dumps(EXPIRED_ERROR), self.keep_ttl_s, CALLBACK_GRACE_S]
        return self._run_many("CLAIM", [([job_key(job_id)], [job_id, *shared]) for job_id in job_ids], client=client)

    @staticmethod
    def claim_result(reply: Any) -> Claim:
        outcome, token, lost, *more = [item.decode() if isinstance(item, bytes) else item for item in reply]
        if not more:
            return Claim(outcome=str(outcome), token=int(token), lost=int(lost))
        queued_s, priority, expires_at, tenant, deadline_at = more
        return Claim(
            str(outcome),
            int(token),
            int(lost),
            float(queued_s),
            str(priority),
            float(expires_at or "inf"),
            str(tenant),
            float(deadline_at or "inf"),
        )

    def begin(self, leases: list[tuple[str, int]]) -> list[bool]:
        """Mark attempts as computing (no cancelling from here); False for an attempt that was fenced off, or whose
        job passed its queue deadline while it waited for a batch (it ends `expired`, without compute)."""
        pipe = self._redis.pipeline(transaction=False)
        expired = json.dumps(EXPIRED_ERROR)
        # Should the process die now, the batch size tells whether the death proves a job guilty (run alone), and
        # the pass id whether its pass was still the process's last one.
        shared = [expired, self.keep_ttl_s, CALLBACK_GRACE_S, len(leases), uuid.uuid4().hex]
        calls = [([job_key(job_id)], [job_id, token, *shared]) for job_id, token in leases]
        self._run_many("BEGIN", calls, client=pipe)
        return [_text(reply) == "ok" for reply in self.replies_of(self.execute(pipe))]

    def renew(self, leases: list[tuple[str, int]], *, lease_s: float) -> list[bool]:
        """Extend the leases of live attempts in one round trip; False where the attempt no longer owns its job."""
        pipe = self._redis.pipeline(transaction=False)
        self._run_many(
            "RENEW", [([job_key(job_id)], [job_id, token, lease_s]) for job_id, token in leases], client=pipe
        )
        return [_text(reply) == "ok" for reply in self.replies_of(self.execute(pipe))]

    def finish(self, outcomes: list[Outcome]) -> list[str]:
        """Write the outcomes of live attempts in one round trip.

        Each reply is 'ok', 'ok:callback' (a callback is now owed), 'fenced' (another attempt owns the job, or it
        was cancelled or timed out) or 'missing'."""
        pipe = self._redis.pipeline(transaction=False)
        calls = []
        for o in outcomes:
            payloads = [json.dumps(o.result) if o.result is not None else "", json.dumps(o.error) if o.error else ""]
            args = [o.job_id, o.token, o.status.value, *payloads, self.result_ttl_s, CALLBACK_GRACE_S, o.batch_size]
            calls.append(([job_key(o.job_id)], args))
        self._run_many("FINISH", calls, client=pipe)
        return [_text(reply) for reply in self.replies_of(self.execute(pipe))]

    def hand_off(self, job_id: str, token: int, *, tensor_ref: str, image_info: dict[str, Any] | None) -> str:
        """The decoding stage of the attempt `token` is done: 'ok', or 'fenced' if the attempt lost its job."""
        return str(self._run("HANDOFF", job_id, token, tensor_ref, json.dumps(image_info)))

    def release(self, job_id: str, token: int, *, backoff_s: float, error: dict[str, Any]) -> str:
        """A transient failure: back to the queue after `backoff_s`, or 'dead' when the attempts are used up."""
        args = [token, backoff_s, json.dumps(error), self.result_ttl_s, CALLBACK_GRACE_S]
        return str(self._run("RELEASE", job_id, *args))

    # --- cancelling, expiry, recovery

    def cancel(self, job_id: str) -> None:
        """Cancel a job that has not started computing; cancelling a cancelled job again is a no-op."""
        outcome = str(self._run("CANCEL", job_id, json.dumps(CANCELLED_ERROR), self.result_ttl_s, CALLBACK_GRACE_S))
        if outcome == "missing":
            raise UnknownJob(f"no job with id {job_id!r}")
        if outcome not in ("ok", JobStatus.CANCELLED.value):
            raise JobNotCancellable(f"job {job_id} is {outcome}; only a job that has not started can be cancelled")

    def expire(self, job_id: str) -> str:
        return str(self._run("EXPIRE", job_id, json.dumps(EXPIRED_ERROR), self.result_ttl_s, CALLBACK_GRACE_S))

    def recover(self, job_id: str, *, backoff_s: float) -> str:
        """A running job whose lease lapsed: 'requeued', 'dead' (attempts used up), 'live' or 'gone'."""
        return str(self._run("RECOVER", job_id, backoff_s, self.result_ttl_s, CALLBACK_GRACE_S))

    def requeue_dead(self, job_id: str) -> str:
        return str(self._run("REQUEUE_DEAD", job_id, self.queued_ttl_s, self.keep_ttl_s))

    def due(self, index: str, *, limit: int = 500) -> list[str]:
        """Members of a time-scored index whose time has come."""
        members: list[str] = self._redis.zrangebyscore(index, "-inf", self.server_time_s(), start=0, num=limit)  # type: ignore[assignment]
        return members

    def take_retry(self, job_id: str) -> bool:
        """True for the one caller (of many reconcilers) that removed the job from the retry index."""
        return bool(self._redis.zrem(retries_key(), job_id))

    def dead_letters(self, *, limit: int = 1000) -> list[str]:
        return list(self._redis.zrange(dead_letter_key(), 0, limit - 1))  # type: ignore[arg-type]

    def running(self) -> list[str]:
        return list(self._redis.zrange(leases_key(), 0, -1))  # type: ignore[arg-type]

    # --- callbacks

    def take_callback(self, job_id: str, *, in_flight_s: float) -> bool:
        return self._run("CALLBACK_TAKE", job_id, in_flight_s) == "ok"

    def callback_done(self, job_id: str, outcome: str, detail: str, *, retry_in_s: float = 0.0) -> str:
        return str(self._run("CALLBACK_DONE", job_id, outcome, detail, retry_in_s))

    def due_callbacks(self) -> list[str]:
        return self.due(callbacks_key())


def _past_deadline(fields: dict[str, str], now_s: float) -> bool:
    return fields.get("status") == JobStatus.QUEUED and now_s > float(fields.get("expires_at") or "inf")


def render_view(job_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The job as clients see it, from its stored fields."""
    view: dict[str, Any] = {
        "job_id": job_id,
        "model": fields.get("model"),
        "model_version": fields.get("model_version"),
        "status": fields.get("status"),
        "submitted_at": _iso(fields.get("submitted_at")),
        "started_at": _iso(fields.get("started_at")),
        "finished_at": _iso(fields.get("finished_at")),
        # A job decoded by its own stage took one claim more; that is not an attempt the client should count.
        "attempts": int(fields.get("attempts") or "0") - int(fields.get("handoffs") or "0"),
        "result": _json_or_none(fields.get("result")),
        "error": _json_or_none(fields.get("error")),
        "batch_size": int(fields.get("batch_size") or "0") or None,
    }
    if fields.get("callback_url"):
        view["callback"] = {
            "state": fields.get("callback_state") or "waiting",
            "attempts": int(fields.get("callback_attempts") or "0"),
            "last": fields.get("callback_last") or None,
            "delivered_at": _iso(fields.get("callback_done_at"))
            if fields.get("callback_state") == "delivered"
            else None,
        }
    return view
