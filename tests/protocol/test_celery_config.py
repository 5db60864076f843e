"""Celery's configuration carries the guarantees later issues build on."""

from __future__ import annotations

import pytest

from config import DEFAULT_REGISTRY_PATH, Settings
from protocol.celery_config import build_celery, celery_config
from protocol.errors import ConfigError
from protocol.registry import load_registry

REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


def test_json_only_late_acks_prefetch_one_and_a_result_ttl() -> None:
    conf = celery_config(Settings(result_ttl_s=123), REGISTRY)
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["accept_content"] == conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["result_expires"] == 123


def test_each_model_has_its_own_queue_and_route() -> None:
    app = build_celery(Settings(), REGISTRY)
    assert app.conf.task_routes == {
        "inferq.infer.chest-xray": {"queue": "chest-xray"},
        "inferq.infer.fraud": {"queue": "fraud"},
    }
    queues = app.conf.task_queues
    assert [q.name for q in queues] == ["chest-xray", "fraud"]
    # One exchange and key per queue: a shared binding would copy each message into every queue.
    assert [(q.exchange.name, q.routing_key) for q in queues] == [("chest-xray", "chest-xray"), ("fraud", "fraud")]


def test_the_visibility_timeout_must_outlast_every_time_limit() -> None:
    with pytest.raises(ConfigError, match="visibility"):
        celery_config(Settings(broker_visibility_timeout_s=60), REGISTRY)
