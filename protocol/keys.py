"""Every Redis key, queue and task name inferq uses, in one place.

The broker's own keys (queues, `unacked`, bindings) belong to kombu; ours all start with `inferq:` so that a
shared Redis can be inspected and cleaned by prefix.
"""

from __future__ import annotations

import hashlib

PREFIX = "inferq"
TASK_PREFIX = "inferq.infer"
PREP_TASK_PREFIX = "inferq.prep"
MANY_TASK_PREFIX = "inferq.infer_many"
# A message of `many_task_name_for` names its jobs in this header, so the reconciler sees each job in the broker.
JOBS_HEADER = "inferq_jobs"
CALLBACK_TASK = "inferq.deliver_callback"
CALLBACK_QUEUE = "inferq-callbacks"
# kombu's Redis transport keeps one list per priority step, named queue + separator + step (step 0: bare name).
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
# Three steps per priority class (stat 0-2, urgent 3-5, routine 6-8), one per deadline tier: protocol.priority.
KOMBU_PRIORITY_STEPS = tuple(range(9))
# kombu's Redis transport: delivered but unacknowledged messages, by delivery tag.
KOMBU_UNACKED_HASH = "unacked"
# ... and their delivery times (epoch seconds, the worker's clock), by delivery tag.
KOMBU_UNACKED_INDEX = "unacked_index"


def queue_for(model: str) -> str:
    """The broker queue of a model: its own name, so `celery worker -Q chest-xray` reads as it should."""
    return model


def task_name_for(model: str) -> str:
    return f"{TASK_PREFIX}.{model}"


def flower_journal_key() -> str:
    """The Celery events Flower received, as JSON, for it to replay after a restart (producers.flower)."""
    return f"{PREFIX}:flower:events"


def many_task_name_for(model: str) -> str:
    """The task that runs a chunk of a bulk submission's jobs (of a model that decodes in its own workers)."""
    return f"{MANY_TASK_PREFIX}.{model}"


def prep_task_name_for(model: str) -> str:
    """The task that decodes a job of a model whose preprocessing runs as its own stage."""
    return f"{PREP_TASK_PREFIX}.{model}"


def queue_lists(queue: str, *, buckets: int = 1) -> list[str]:
    """The Redis lists that hold a job queue's waiting messages: one per kombu priority step, for each of its
    `buckets` tenant sub-queues."""
    return [
        name if step == 0 else f"{name}{KOMBU_PRIORITY_SEPARATOR}{step}"
        for name in tenant_queues(queue, buckets)
        for step in KOMBU_PRIORITY_STEPS
    ]


def tenant_queue(queue: str, bucket: int) -> str:
    """A job queue's (a model's, or its decoding stage's) tenant sub-queue `bucket` (protocol.fairness); bucket 0 is
    the queue itself, so that one bucket is exactly the old layout and `celery worker -Q chest-xray` names the model."""
    return queue if bucket == 0 else f"{queue}.t{bucket}"


def tenant_queues(queue: str, buckets: int) -> list[str]:
    return [tenant_queue(queue, bucket) for bucket in range(max(1, buckets))]


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def blob_key(blob_ref: str) -> str:
    return f"{PREFIX}:blob:{blob_ref}"


def idempotency_key(model: str, key: str) -> str:
    return f"{PREFIX}:idem:{model}:{key}"


def done_channel() -> str:
    """Pub/sub channel on which every job that reaches a final state is announced (the message is its id)."""
    return f"{PREFIX}:done"


def leases_key() -> str:
    """Sorted set of running jobs, scored by the time their lease lapses (epoch seconds)."""
    return f"{PREFIX}:leases"


def queued_key() -> str:
    """Sorted set of queued jobs, scored by their queue deadline: past it, a job that has not started expires."""
    return f"{PREFIX}:queued"


def published_key() -> str:
    """Sorted set of queued jobs, scored by when their message was last published (to find lost messages)."""
    return f"{PREFIX}:published"


def retries_key() -> str:
    """Sorted set of jobs waiting to be published again, scored by when their backoff ends."""
    return f"{PREFIX}:retries"


def dead_letter_key() -> str:
    """Sorted set of jobs that used up their attempts, scored by when they were dead-lettered."""
    return f"{PREFIX}:dead-letter"


def callbacks_key() -> str:
    """Sorted set of jobs whose callback is owed, scored by when the next delivery attempt is due."""
    return f"{PREFIX}:callbacks"


def consumers_key(queue: str) -> str:
    """Sorted set of worker nodes consuming `queue`, scored by their last heartbeat (epoch seconds)."""
    return f"{PREFIX}:consumers:{queue}"


def pass_key(node: str, pid: str) -> str:
    """The forward pass a worker process began last (an id per batch): a job whose own pass was followed by another
    had finished computing when its process died, so that death is not its fault."""
    return f"{PREFIX}:pass:{node}:{pid}"


def reconciler_lock_key() -> str:
    return f"{PREFIX}:reconciler:lock"


def dead_letter_queue_for(queue: str) -> str:
    """RabbitMQ only: where a queue's messages go once delivered too often (`x-delivery-limit`)."""
    return f"{queue}.dead"


def api_key_record(key_id: str) -> str:
    """A hash per API key: tenant, roles, the sha256 of the secret, created_at. Never the key itself."""
    return f"{PREFIX}:apikey:{key_id}"


def api_key_index() -> str:
    """The set of all key ids, for `inferq keys list`."""
    return f"{PREFIX}:apikeys"


def idempotency_token(tenant: str, model: str, key: str) -> str:
    """What a client's idempotency key becomes in Redis: a hash, since a hospital's natural key (an accession
    number) identifies a patient; the tenant in it keeps tenants' keys apart."""
    digest = hashlib.sha256()
    for part in (tenant, model, key):
        digest.update(part.encode("utf-8") + b"\x00")
    return digest.hexdigest()


def model_waiting_key(model: str) -> str:
    """Sorted set of a model's waiting jobs (queued records, of every tenant), by submission time: its queue depth
    in jobs, however many of them travel in one message."""
    return f"{PREFIX}:mq:{model}"


def urgent_waiting_key(model: str) -> str:
    """Sorted set of a model's waiting stat and urgent jobs, scored by class rank (0 stat, 1 urgent): lets a worker
    that is about to start a routine batch see, in one call, that a more urgent job is on its way."""
    return f"{PREFIX}:mu:{model}"


def tenant_waiting_key(tenant: str, model: str) -> str:
    """Sorted set of a tenant's waiting jobs of one model, by submission time: the queue as that tenant sees it."""
    return f"{PREFIX}:tq:{tenant}:{model}"


def tenant_jobs_key(tenant: str) -> str:
    """Sorted set of a tenant's jobs by submission time, for its job listing."""
    return f"{PREFIX}:tjobs:{tenant}"


def stats_key(name: str) -> str:
    """A hash of cluster-wide counters written by the Lua scripts (field: label values joined by `|`), read by
    the API's /metrics: e.g. `finished` (model|status|code), `recoveries`, `redeliveries`, `callbacks`."""
    return f"{PREFIX}:stats:{name}"


def failures_key(minute: int) -> str:
    """A hash of failed jobs per model in one minute (epoch seconds // 60), kept an hour, for `inferq status`."""
    return f"{PREFIX}:failures:{minute}"


def worker_slots_key(node: str) -> str:
    """The jobs a worker node holds at once, refreshed with its heartbeat and expiring when it stops beating."""
    return f"{PREFIX}:slots:{node}"
