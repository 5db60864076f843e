"""Every Prometheus metric inferq exports, in one place (torch-free; the GPU gauges live in `workers.metrics`).

Two sources, two kinds of metric:
- Events seen by a worker process (an outcome it recorded, a batch it ran, how long a job waited and computed) are
  counters and histograms defined here and updated in that process. `inferq worker` runs several Celery nodes, so
  they run in prometheus-client's multiprocess mode: each node writes its values to files in a folder the
  supervisor made, and the supervisor serves their sum on `worker_metrics_port`. A node that dies leaves its files,
  so nothing it counted is lost.
- The cluster's state and the transitions that any process may make (a job finalized by a worker, the reconciler,
  a cancel; a lease recovered; a callback delivered) are read from Redis on each scrape of the API's /metrics:
  gauges from the indexes and heartbeats, counters from hashes that the Lua scripts increment
  (`protocol.keys.stats_key`). Every API replica exports the same values: aggregate them with `max`, not `sum`.

No label carries a job id, a tenant or anything from an upload: labels are models, queues, statuses, error codes
and outcomes, all bounded by the registry and the code.
"""

from __future__ import annotations

import time
from collections import Counter as Tally

import redis
from prometheus_client import Counter, Histogram

from inferq.protocol.keys import failures_key, stats_key

# Seconds: from a fast tensor job to one that waited in a queue for an hour.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# --- per worker process (multiprocess mode under `inferq worker`)

WORKER_JOBS = Counter(
    "inferq_worker_jobs",
    "Job outcomes recorded by worker processes, by final status and error code ('' on success).",
    ["model", "status", "code"],
)
WORKER_CLAIMS = Counter(
    "inferq_worker_claims",
    "Attempts started by worker processes; redelivered='true' for a job's second or later attempt.",
    ["model", "redelivered"],
)
JOB_LATENCY = Histogram(
    "inferq_job_latency_seconds",
    "End to end: from submission until the worker recorded the outcome.",
    ["model", "status"],
    buckets=LATENCY_BUCKETS_S,
)
JOB_QUEUE = Histogram(
    "inferq_job_queue_seconds",
    "Time in queue: from submission until a worker claimed the attempt (retries included).",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
JOB_COMPUTE = Histogram(
    "inferq_job_compute_seconds",
    "Time in the worker: from the claim until the outcome was recorded (decoding, batching, forward pass).",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "inferq_batch_size",
    "Jobs per forward pass of the dynamic batcher.",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "inferq_batch_seconds",
    "Duration of one forward pass of a batch.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)


def record_outcome(model: str, status: str, code: str, *, queued_s: float, compute_s: float) -> None:
    """One recorded outcome of a worker: its count and its three durations."""
    WORKER_JOBS.labels(model, status, code).inc()
    JOB_COMPUTE.labels(model).observe(compute_s)
    JOB_LATENCY.labels(model, status).observe(queued_s + compute_s)


def record_claim(model: str, *, token: int, queued_s: float) -> None:
    WORKER_CLAIMS.labels(model, "true" if token > 1 else "false").inc()
    JOB_QUEUE.labels(model).observe(max(0.0, queued_s))


def record_batch(model: str, *, jobs: int, seconds: float) -> None:
    BATCH_SIZE.labels(model).observe(jobs)
    BATCH_SECONDS.labels(model).observe(seconds)


# --- cluster-wide counters kept in Redis by the Lua scripts (protocol.job_scripts)

# name in Redis -> (metric name, help, label names). The hash fields are the label values joined by '|'.
REDIS_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "finished": (
        "inferq_jobs_finished",
        "Jobs that reached a final state, whichever process ended them, by status and error code.",
        ("model", "status", "code"),
    ),
    "claims": ("inferq_job_attempts", "Attempts started (claims), first ones and redeliveries.", ("model",)),
    "redeliveries": (
        "inferq_job_redeliveries",
        "Attempts after the first: a transient failure, a lost worker or a lost lease ran the job again.",
        ("model",),
    ),
    "recoveries": (
        "inferq_lease_recoveries",
        "Running jobs whose lease lapsed, recovered by the reconciler: requeued, or dead-lettered.",
        ("model", "outcome"),
    ),
    "callbacks": (
        "inferq_callback_deliveries",
        "Callback delivery attempts by outcome: delivered, retry (will be tried again) or failed (given up).",
        ("outcome",),
    ),
}


def read_counts(client: redis.Redis, name: str) -> dict[tuple[str, ...], int]:
    """A Redis counter hash as {label values: count}; fields with the wrong number of parts are skipped."""
    width = len(REDIS_COUNTERS[name][2])
    stored: dict[str, str] = client.hgetall(stats_key(name))  # type: ignore[assignment]
    counts = {}
    for field, value in stored.items():
        labels = tuple(str(field).split("|"))
        if len(labels) == width:
            counts[labels] = int(value)
    return counts


def recent_failures(client: redis.Redis, *, minutes: int, now_s: float | None = None) -> dict[str, int]:
    """Failed jobs per model over the last `minutes` whole minutes and the current one."""
    current = int((now_s if now_s is not None else time.time()) // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes, current + 1):
        pipe.hgetall(failures_key(minute))
    totals: Tally[str] = Tally()
    for bucket in pipe.execute():
        totals.update({str(model): int(count) for model, count in bucket.items()})
    return dict(totals)


__all__ = [
    "BATCH_SIZE",
    "JOB_COMPUTE",
    "JOB_LATENCY",
    "JOB_QUEUE",
    "REDIS_COUNTERS",
    "WORKER_CLAIMS",
    "WORKER_JOBS",
    "read_counts",
    "recent_failures",
    "record_batch",
    "record_claim",
    "record_outcome",
]
