"""Celery's configuration, built from the settings and the registry passed in; one function, one place.

Producers use the app to send tasks by name; workers register the tasks on it; Flower watches it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from config import Settings
from protocol.connections import tls_options
from protocol.errors import ConfigError
from protocol.keys import queue_for, task_name_for
from protocol.registry import Registry

# The hard limit leaves a soft-limited task this long to record its failure before the process is killed.
HARD_LIMIT_GRACE_S = 15.0


def _queue(name: str) -> Queue:
    # Each queue gets its own direct exchange and key. Left to Celery's defaults, every queue is declared on the
    # default queue's exchange and key (the worker banner showed `fraud` bound to `chest-xray`), so routing would
    # rest on the queue name alone; a message copied into two queues was not observed, but nothing ruled it out.
    queue = queue_for(name)
    return Queue(queue, Exchange(queue, type="direct"), routing_key=queue)


def celery_config(settings: Settings, registry: Registry) -> dict[str, Any]:
    """Every value that differs from Celery's default, with the reason."""
    url = settings.redis_url_or_default
    longest_s = max(spec.time_limit_s for spec in registry.values()) + HARD_LIMIT_GRACE_S
    if settings.broker_visibility_timeout_s <= longest_s:
        raise ConfigError(
            f"broker_visibility_timeout_s ({settings.broker_visibility_timeout_s}) must exceed the longest time "
            f"limit plus grace ({longest_s}), or Redis redelivers jobs that are still running"
        )
    return {
        "broker_url": url,
        "result_backend": url,
        # JSON only, in messages, results and events: no Python object serialization anywhere.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # Acknowledge after the task ran, and give the message back if the worker process dies mid-task.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Inference jobs are long: a process holds one message at a time, so others can take the rest.
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.result_ttl_s,
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
        "task_routes": {task_name_for(name): {"queue": queue_for(spec.queue_name)} for name, spec in registry.items()},
        "task_queues": [_queue(spec.queue_name) for spec in registry.values()],
        "task_default_queue": queue_for(next(iter(registry.values())).queue_name),
        # Flower shows tasks from events: workers send them, producers announce each task sent.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A child process loads and warms its models before reporting up; DenseNet on 2 cores needs more than 4 s.
        "worker_proc_alive_timeout": 300.0,
        # On a lost broker connection, stop running tasks: late acks mean they will be redelivered anyway.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        **_tls_config(settings),
    }


def _tls_config(settings: Settings) -> dict[str, Any]:
    # kombu connects to a rediss:// broker without checking the server's certificate unless told to.
    options = tls_options(settings.redis_url_or_default, settings.redis_tls_ca_file)
    return {"broker_use_ssl": options, "redis_backend_use_ssl": options} if options else {}


def build_celery(settings: Settings, registry: Registry) -> Celery:
    app = Celery("inferq", set_as_current=False)
    app.conf.update(celery_config(settings, registry))
    return app
