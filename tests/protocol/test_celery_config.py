"""Celery's configuration carries the guarantees later issues build on."""

from __future__ import annotations

import pytest

from config import DEFAULT_REGISTRY_PATH, Settings
from protocol.celery_config import build_celery, celery_config
from protocol.errors import InvalidRequest
from protocol.registry import load_registry

REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


def test_json_only_late_acks_no_result_backend_and_a_threads_pool_sized_to_batch() -> None:
    conf = celery_config(Settings(), REGISTRY)
    assert conf["task_serializer"] == conf["event_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["task_ignore_result"] and "result_backend" not in conf
    assert conf["worker_pool"] == "threads" and conf["worker_prefetch_multiplier"] == 1
    # fraud batches up to 256 rows: twice that, capped, so a process holds a batch computing and one filling
    assert conf["worker_concurrency"] == 64


def test_each_model_has_its_own_queue_and_route() -> None:
    app = build_celery(Settings(), REGISTRY)
    assert app.conf.task_routes == {
        "inferq.infer.chest-xray": {"queue": "chest-xray"},
        "inferq.infer.fraud": {"queue": "fraud"},
        "inferq.deliver_callback": {"queue": "inferq-callbacks"},
    }
    queues = app.conf.task_queues
    assert [q.name for q in queues] == ["chest-xray", "fraud", "inferq-callbacks"]
    # One exchange and key per queue: a shared binding would copy each message into every queue.
    assert [(q.exchange.name, q.routing_key) for q in queues] == [
        ("chest-xray", "chest-xray"),
        ("fraud", "fraud"),
        ("inferq-callbacks", "inferq-callbacks"),
    ]


def test_the_visibility_timeout_must_outlast_every_time_limit() -> None:
    with pytest.raises(InvalidRequest, match="visibility"):
        celery_config(Settings(broker_visibility_timeout_s=60), REGISTRY)
