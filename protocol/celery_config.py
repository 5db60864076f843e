"""Celery's configuration, built from the settings and the registry passed in; one function, one place.

Producers use the app to send tasks by name; workers register the tasks on it; Flower watches it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from celery import Celery
from kombu import Exchange, Queue

from inferq.config import Settings
from inferq.protocol import redis_transport
from inferq.protocol.connections import tls_options
from inferq.protocol.errors import ConfigError
from inferq.protocol.keys import (
    CALLBACK_QUEUE,
    CALLBACK_TASK,
    JOBS_HEADER,
    KOMBU_PRIORITY_SEPARATOR,
    KOMBU_PRIORITY_STEPS,
    dead_letter_queue_for,
    many_task_name_for,
    prep_task_name_for,
    queue_for,
    task_name_for,
    tenant_queues,
)
from inferq.protocol.registry import ModelSpec, Registry

# Jobs one worker process holds at once, by default: one batch. Holding a second batch while the first computes
# (as before) let that second batch of routine jobs, fetched before a STAT job arrived, run ahead of it; holding one,
# the freed slots are refilled from the broker, which hands out the STAT job first, so that a STAT job waits at
# most for the batch in progress. The price is the claim and decoding of the next batch no longer overlapping the
# forward pass (measured by scripts/bench_priority.py; INFERQ_WORKER_SLOTS sets it back).
_MAX_DEFAULT_SLOTS = 64


def default_slots(specs: list[ModelSpec]) -> int:
    return min(_MAX_DEFAULT_SLOTS, max((spec.max_batch_size for spec in specs), default=1))


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport: its lists and how one BRPOP reads them (protocol.priority, protocol.fairness)."""
    return {
        "visibility_timeout": settings.broker_visibility_timeout_s,
        # One list per step; BRPOP names the steps in this order, so step 0 (stat, tightest deadline) is taken
        # first. The separator is kombu's default, said here because protocol.keys builds the same names.
        "priority_steps": list(KOMBU_PRIORITY_STEPS),
        "sep": KOMBU_PRIORITY_SEPARATOR,
        # Within a step, the tenant sub-queue just served goes to the back: tenants take turns.
        "queue_order_strategy": "round_robin",
    }


def _queue(name: str) -> Queue:
    # Each queue gets its own direct exchange and key. Left to Celery's defaults, every queue is declared on the
    # default queue's exchange and key (the worker banner showed `fraud` bound to `chest-xray`), so routing would
    # rest on the queue name alone; a message copied into two queues was not observed, but nothing ruled it out.
    queue = queue_for(name)
    return Queue(queue, Exchange(queue, type="direct"), routing_key=queue)


def celery_config(settings: Settings, registry: Registry) -> dict[str, Any]:
    """Every value that differs from Celery's default, with the reason."""
    broker_url = settings.broker_url_or_default
    longest_s = max(spec.hard_limit_s for spec in registry.values())
    if settings.broker_visibility_timeout_s <= longest_s:
        raise ConfigError(
            f"broker_visibility_timeout_s ({settings.broker_visibility_timeout_s}) must exceed the longest hard time "
            f"limit ({longest_s}), or Redis redelivers jobs that are still running"
        )
    return {
        "broker_url": broker_url,
        **({"broker_transport": redis_transport.TRANSPORT} if broker_url.lower().startswith("redis://") else {}),
        # No result backend: the job record is the source of truth, and writing Celery's copy cost a round trip.
        "task_ignore_result": True,
        # JSON only, in messages and events: no Python object serialization anywhere.
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Acknowledge after the task ran: a message held by a worker that dies is given back by the broker.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A worker process is a node with a thread per job it holds, so that jobs that are there together can run
        # as one batch; prefetch equals the threads, and no process hoards more than it can batch.
        "worker_pool": "threads",
        "worker_concurrency": default_slots(list(registry.values())),
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": redis_transport_options(settings),
        "task_routes": {
            CALLBACK_TASK: {"queue": CALLBACK_QUEUE},
            **{task_name_for(name): {"queue": queue_for(spec.queue_name)} for name, spec in registry.items()},
            **{many_task_name_for(name): {"queue": queue_for(spec.queue_name)} for name, spec in registry.items()},
            **{
                prep_task_name_for(name): {"queue": spec.prep_queue_name}
                for name, spec in registry.items()
                if spec.prep_queue_name
            },
        },
        "task_default_queue": queue_for(next(iter(registry.values())).queue_name),
        # Flower shows tasks from events: workers send them, producers announce each task sent.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A process loads and warms its models before it consumes; DenseNet on 2 cores needs more than 4 s.
        "worker_proc_alive_timeout": 300.0,
        # Threads cannot be cancelled; on a lost connection, running jobs finish and leases protect the rest.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        **_tls_config(settings),
        **broker_options(settings, registry),
    }


BrokerKind = Literal["redis", "amqp"]
_BROKER_SCHEMES: dict[str, BrokerKind] = {
    "redis": "redis",
    "rediss": "redis",
    "amqp": "amqp",
    "amqps": "amqp",
    "pyamqp": "amqp",
}


def broker_kind(url: str) -> BrokerKind:
    """Which engine a broker URL names; anything else is refused before a worker starts on it."""
    scheme = url.partition("://")[0].lower()
    if scheme not in _BROKER_SCHEMES:
        raise ConfigError(f"broker_url must be redis://, rediss:// or amqp://, got {scheme!r}://")
    return _BROKER_SCHEMES[scheme]


class _QuorumQueue(Queue):
    """A quorum queue that declares its dead-letter queue first, wherever Celery declares it (worker start,
    publish): RabbitMQ silently drops messages dead-lettered to a queue that does not exist."""

    # kombu copies a queue from its `attrs` (each binding to a channel is a copy), so the link is one of them.
    attrs = (*Queue.attrs, ("dead_letter", None))  # type: ignore[assignment]  # one more entry than kombu's
    dead_letter: Queue | None = None

    def declare(self, nowait: bool = False, channel: Any = None) -> str:
        if self.dead_letter is not None:
            self.dead_letter.declare(nowait=nowait, channel=channel or self.channel)
        return str(super().declare(nowait=nowait, channel=channel))


def _amqp_queue(name: str, *, delivery_limit: int) -> Queue:
    queue = queue_for(name)
    dead = dead_letter_queue_for(queue)
    # Quorum queues are replicated and count deliveries: a message redelivered `delivery_limit` times (a job that
    # kills its worker) goes to `<queue>.dead` through the default exchange instead of looping forever. A topic
    # exchange with the queue's own key routes like a direct one and lets Celery's native delayed delivery (used
    # for countdowns on quorum queues) bind the queue.
    return _QuorumQueue(
        queue,
        Exchange(queue, type="topic"),
        routing_key=queue,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead,
        },
        dead_letter=Queue(dead, queue_arguments={"x-queue-type": "quorum"}),
    )


def _queue_names(settings: Settings, registry: Registry) -> list[str]:
    """Every job queue with its tenant sub-queues, then the callbacks' own."""
    buckets = settings.tenant_buckets
    return [name for queue in model_queue_names(registry) for name in tenant_queues(queue, buckets)] + [CALLBACK_QUEUE]


def model_queue_names(registry: Registry) -> list[str]:
    """The queues that carry jobs: each model's, and its decoding stage's where that runs separately. Each stands
    for its tenant sub-queues too (`protocol.keys.tenant_queues`): a decoding stage is shared between tenants as
    much as a model is, so it gets the same fairness."""
    stages = [spec.prep_queue_name for spec in registry.values() if spec.prep_queue_name]
    return [spec.queue_name for spec in registry.values()] + stages


def stage_queue_names(spec: ModelSpec) -> list[str]:
    """One model's job queues: its own, then its decoding stage's where that runs separately."""
    return [spec.queue_name] + ([spec.prep_queue_name] if spec.prep_queue_name else [])


def message_job_ids(raw: str | bytes, *, envelope: bool = False) -> list[str]:
    """The jobs of a kombu Redis message (the unacked hash wraps it as [message, exchange, routing key]): its task
    id, then the jobs it carries when it is a chunk of a bulk submission; [] for what is not a task message."""
    try:
        message: Any = json.loads(raw)
        if envelope:
            message = message[0]
        headers = message["headers"]
        return [str(headers["id"]), *(str(job_id) for job_id in headers.get(JOBS_HEADER) or [])]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return []


def entry_task(spec: ModelSpec) -> str:
    """The task a new job is sent to: its decoding stage where that runs separately, else the model's."""
    return prep_task_name_for(spec.name) if spec.preprocess == "separate" else task_name_for(spec.name)


def entry_queue(spec: ModelSpec) -> str:
    """The queue of `entry_task` (before the tenant's sub-queue is picked: protocol.fairness)."""
    return spec.prep_queue_name or spec.queue_name


def broker_options(settings: Settings, registry: Registry) -> dict[str, Any]:
    """The queues, and what differs per broker kind; Redis keeps the queues of `_queue` unchanged."""
    if broker_kind(settings.broker_url_or_default) == "redis":
        return {"task_queues": [_queue(name) for name in _queue_names(settings, registry)]}
    limit = settings.broker_delivery_limit
    return {
        "task_queues": [_amqp_queue(name, delivery_limit=limit) for name in _queue_names(settings, registry)],
        # Quorum queues refuse a global prefetch; Celery then sets it per consumer (its default, said explicitly).
        "worker_detect_quorum_queues": True,
        # Publisher confirms: a 202 means RabbitMQ has stored the message, not merely that it left the socket.
        "broker_transport_options": {"confirm_publish": True},
    }


def _tls_config(settings: Settings) -> dict[str, Any]:
    # kombu connects to a rediss:// broker without checking the server's certificate unless told to.
    options = tls_options(settings.broker_url_or_default, settings.redis_tls_ca_file)
    return {"broker_use_ssl": options} if options else {}


def build_celery(settings: Settings, registry: Registry) -> Celery:
    app = Celery("inferq", set_as_current=False)
    app.conf.update(celery_config(settings, registry))
    return app
