"""The cluster as the API's /metrics and `inferq status` see it, read from Redis at the moment of asking.

Per model: messages waiting in its queue and the age of the oldest, jobs running, worker processes consuming its
queue and their slots, and the load signal `(running + queued) / capacity` that KEDA scales on
(deploy/kubernetes/keda*.yaml). Counters of transitions come from the Redis hashes the Lua scripts keep
(`protocol.metrics.REDIS_COUNTERS`). Nothing here carries a job id or a tenant.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferq.config import Settings
from inferq.producers.readiness import HEARTBEAT_STALE_S
from inferq.protocol.connections import stores_for
from inferq.protocol.errors import InferqError
from inferq.protocol.jobs import JobStore
from inferq.protocol.keys import consumers_key, dead_letter_key, job_key, leases_key, worker_slots_key
from inferq.protocol.metrics import REDIS_COUNTERS, read_counts, recent_failures
from inferq.protocol.registry import Registry, load_registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueView:
    """One model's queue right now."""

    model: str
    queue: str
    depth: int
    oldest_age_s: float | None  # None: nothing waiting, or a broker whose messages cannot be read (RabbitMQ)
    running: int
    workers: int
    slots: int

    @property
    def load(self) -> float:
        """(running + queued) / capacity; with no capacity, the backlog itself, so a scaler starts one from zero."""
        demand = self.running + self.depth
        return demand / self.slots if self.slots else float(demand)


def snapshot(client: redis.Redis, registry: Registry, jobs: JobStore) -> list[QueueView]:
    """Every registry model's queue; `client` decodes to str. Depth and age come from the job records (every
    broker, however many jobs travel in one message); capacity from the workers' heartbeats."""
    now_s = _server_time_s(client)
    names = list(registry)
    depths, oldest = jobs.model_queue_depths(names), jobs.oldest_waiting_at(names)
    running = _running_per_model(client)
    views = []
    for name, spec in registry.items():
        workers, slots = _capacity(client, spec.queue_name, now_s)
        submitted_s = oldest[name]
        waited_s = max(0.0, now_s - submitted_s) if submitted_s is not None else None
        views.append(QueueView(name, spec.queue_name, depths[name], waited_s, running[name], workers, slots))
    return views


def _server_time_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def _running_per_model(client: redis.Redis) -> Counter[str]:
    # The leases index holds running jobs only: at most the slots of all workers, so one read each is bounded.
    job_ids: list[str] = client.zrange(leases_key(), 0, -1)  # type: ignore[assignment]
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(job_key(job_id), "model")
    return Counter(str(model) for model in pipe.execute() if model)


def _capacity(client: redis.Redis, queue: str, now_s: float) -> tuple[int, int]:
    """Live worker processes consuming `queue`, and the jobs they hold at once (their slots)."""
    nodes: list[str] = client.zrangebyscore(consumers_key(queue), now_s - HEARTBEAT_STALE_S, "+inf")  # type: ignore[assignment]
    if not nodes:
        return 0, 0
    slots = client.mget([worker_slots_key(node) for node in nodes])
    return len(nodes), sum(int(s) for s in slots if s)


class ClusterCollector(Collector):
    """Reads the cluster from Redis on every scrape; Redis away gives `inferq_redis_up 0` and nothing else."""

    def __init__(self, client: redis.Redis, registry: Registry, jobs: JobStore):
        self._client = client
        self._registry = registry
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("inferq_redis_up", "1 when the job store answered this scrape.")
        try:
            families = [*self._queue_families(), *self._counter_families()]
            dead = int(self._client.zcard(dead_letter_key()))
        except (redis.RedisError, InferqError) as e:
            log.warning("metrics: the job store or broker does not answer (%s)", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        yield GaugeMetricFamily("inferq_dead_letter_jobs", "Jobs in the dead-letter list.", value=dead)

    def _queue_families(self) -> list[Metric]:
        views = snapshot(self._client, self._registry, self._jobs)
        by_model = [
            ("inferq_queue_depth", "Jobs waiting in the model's queue.", lambda v: v.depth),
            ("inferq_jobs_running", "Jobs of the model a worker holds now.", lambda v: v.running),
            ("inferq_model_load", "(running + queued) / worker capacity; the backlog when no worker.", _load),
        ]
        families: list[Metric] = []
        for name, text, value in by_model:
            family = GaugeMetricFamily(name, text, labels=["model"])
            for view in views:
                family.add_metric([view.model], value(view))
            families.append(family)
        oldest = GaugeMetricFamily(
            "inferq_queue_oldest_age_seconds", "Age of the oldest waiting job (0: none).", labels=["model"]
        )
        for view in views:
            oldest.add_metric([view.model], view.oldest_age_s or 0.0)
        families.append(oldest)
        families += _per_queue(views)
        return families

    def _counter_families(self) -> list[Metric]:
        families: list[Metric] = []
        for stored, (name, text, labels) in REDIS_COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=list(labels))
            for values, count in sorted(read_counts(self._client, stored).items()):
                family.add_metric(list(values), count)
            families.append(family)
        return families


def _load(view: QueueView) -> float:
    return view.load


def _per_queue(views: list[QueueView]) -> list[Metric]:
    processes = GaugeMetricFamily(
        "inferq_worker_processes", "Worker processes whose heartbeat for the queue is fresh.", labels=["queue"]
    )
    slots = GaugeMetricFamily(
        "inferq_worker_slots", "Jobs the queue's live worker processes hold at once.", labels=["queue"]
    )
    seen: set[str] = set()
    for view in views:
        if view.queue not in seen:
            seen.add(view.queue)
            processes.add_metric([view.queue], view.workers)
            slots.add_metric([view.queue], view.slots)
    return [processes, slots]


class ApiProcessCollector(Collector):
    """What this API process itself holds, unlike the cluster view every replica reports alike: sum it over the
    replicas (Prometheus's `instance` label tells them apart)."""

    def __init__(self, waiting: Callable[[], int]) -> None:
        self._waiting = waiting

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "inferq_api_waiting_requests",
            "Requests this API process holds while they wait for jobs to end (wait_s, Prefer: wait).",
            value=self._waiting(),
        )


def api_metrics_registry(*collectors: Collector) -> CollectorRegistry:
    """The API's own registry: the cluster view and the process's own gauges (prometheus-client's default registry,
    with its Python and process collectors, is left out)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def recent_failures_per_model(client: redis.Redis, *, minutes: int) -> dict[str, int]:
    return recent_failures(client, minutes=minutes, now_s=_server_time_s(client))


@dataclass(frozen=True)
class StatusRow:
    """One line of `inferq status`: a queue now, and its failed jobs over the last minutes."""

    view: QueueView
    failed_recently: int


def status_rows(settings: Settings, *, minutes: int) -> list[StatusRow]:
    """Read the whole cluster from Redis (an operator command: it needs INFERQ_REDIS_URL, not an API key)."""
    stores = stores_for(settings)
    try:
        views = snapshot(stores.text, load_registry(settings.registry_path), stores.jobs)
        failed = recent_failures_per_model(stores.text, minutes=minutes)
        return [StatusRow(view, failed.get(view.model, 0)) for view in views]
    finally:
        stores.text.close()


def render_status(rows: list[StatusRow], *, minutes: int) -> str:
    """A fixed-width table, one queue per line."""
    header = ("MODEL", "QUEUE", "WAITING", "OLDEST", "RUNNING", "WORKERS", "SLOTS", "LOAD", f"FAILED/{minutes}m")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        v = row.view
        oldest = "-" if v.oldest_age_s is None else _age(v.oldest_age_s)
        cells = (v.model, v.queue, v.depth, oldest, v.running, v.workers, v.slots, f"{v.load:.2f}", row.failed_recently)
        lines.append(tuple(str(c) for c in cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
