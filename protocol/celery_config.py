"""Celery's configuration, built from the settings and the registry passed in; one function, one place.

Producers use the app to send tasks by name; workers register the tasks on it; Flower watches it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from config import Settings
from protocol.errors import InvalidRequest
from protocol.keys import CALLBACK_QUEUE, CALLBACK_TASK, queue_for, task_name_for
from protocol.registry import ModelSpec, Registry

# Jobs one worker process holds at once, by default: one batch computing and the next one filling.
_MAX_DEFAULT_SLOTS = 64


def default_slots(specs: list[ModelSpec]) -> int:
    return min(_MAX_DEFAULT_SLOTS, 2 * max((spec.max_batch_size for spec in specs), default=1))


def _queue(name: str) -> Queue:
    # Each queue gets its own direct exchange and key. Left to Celery's defaults, every queue is declared on the
    # default queue's exchange and key (the worker banner showed `fraud` bound to `chest-xray`), so routing would
    # rest on the queue name alone; a message copied into two queues was not observed, but nothing ruled it out.
    queue = queue_for(name)
    return Queue(queue, Exchange(queue, type="direct"), routing_key=queue)


def celery_config(settings: Settings, registry: Registry) -> dict[str, Any]:
    """Every value that differs from Celery's default, with the reason."""
    url = settings.redis_url_or_default
    longest_s = max(spec.hard_limit_s for spec in registry.values())
    if settings.broker_visibility_timeout_s <= longest_s:
        raise InvalidRequest(
            f"broker_visibility_timeout_s ({settings.broker_visibility_timeout_s}) must exceed the longest hard time "
            f"limit ({longest_s}), or Redis redelivers jobs that are still running"
        )
    return {
        "broker_url": url,
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
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
        "task_routes": {
            CALLBACK_TASK: {"queue": CALLBACK_QUEUE},
            **{task_name_for(name): {"queue": queue_for(spec.queue_name)} for name, spec in registry.items()},
        },
        "task_queues": [_queue(spec.queue_name) for spec in registry.values()] + [_queue(CALLBACK_QUEUE)],
        "task_default_queue": queue_for(next(iter(registry.values())).queue_name),
        # Flower shows tasks from events: workers send them, producers announce each task sent.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A process loads and warms its models before it consumes; DenseNet on 2 cores needs more than 4 s.
        "worker_proc_alive_timeout": 300.0,
        # Threads cannot be cancelled; on a lost connection, running jobs finish and leases protect the rest.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
    }


def build_celery(settings: Settings, registry: Registry) -> Celery:
    app = Celery("inferq", set_as_current=False)
    app.conf.update(celery_config(settings, registry))
    return app
