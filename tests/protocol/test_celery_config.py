"""Celery's configuration carries the guarantees later issues build on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.protocol.celery_config import (
    broker_kind,
    build_celery,
    celery_config,
    default_slots,
    entry_queue,
    entry_task,
    stage_queue_names,
)
from inferq.protocol.errors import ConfigError
from inferq.protocol.registry import Registry, load_registry

REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


def test_json_only_late_acks_no_result_backend_and_a_threads_pool_sized_to_batch() -> None:
    conf = celery_config(Settings(), REGISTRY)
    assert conf["task_serializer"] == conf["event_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["task_ignore_result"] and "result_backend" not in conf
    assert conf["worker_pool"] == "threads" and conf["worker_prefetch_multiplier"] == 1
    # fraud batches up to 256 rows: a process holds one batch (capped), so the broker orders the next one
    assert conf["worker_concurrency"] == 64
    assert default_slots([REGISTRY.get_model("chest-xray")]) == 8


def test_each_model_has_its_own_queue_and_route() -> None:
    app = build_celery(Settings(tenant_buckets=1), REGISTRY)
    assert app.conf.task_routes == {
        "inferq.infer.chest-xray": {"queue": "chest-xray"},
        "inferq.infer.fraud": {"queue": "fraud"},
        # A bulk submission's chunks travel on the model's queue too.
        "inferq.infer_many.chest-xray": {"queue": "chest-xray"},
        "inferq.infer_many.fraud": {"queue": "fraud"},
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
    with pytest.raises(ConfigError, match="visibility"):
        celery_config(Settings(broker_visibility_timeout_s=60), REGISTRY)


def test_the_broker_defaults_to_redis_and_records_stay_in_redis() -> None:
    conf = celery_config(Settings(redis_url="redis://h:6379/2"), REGISTRY)
    assert conf["broker_url"] == "redis://h:6379/2" and "result_backend" not in conf
    assert {q.queue_arguments is None for q in conf["task_queues"]} == {True}
    assert conf["broker_transport_options"] == {
        "visibility_timeout": Settings().broker_visibility_timeout_s,
        "priority_steps": [0, 1, 2, 3, 4, 5, 6, 7, 8],
        "sep": "\x06\x16",
        "queue_order_strategy": "round_robin",
    }


def test_each_model_queue_has_tenant_sub_queues_with_their_own_bindings() -> None:
    queues = celery_config(Settings(tenant_buckets=3), REGISTRY)["task_queues"]
    assert [q.name for q in queues] == [
        "chest-xray", "chest-xray.t1", "chest-xray.t2", "fraud", "fraud.t1", "fraud.t2", "inferq-callbacks"
    ]  # fmt: skip
    assert all(q.exchange.name == q.routing_key == q.name for q in queues)


def test_rabbitmq_gets_quorum_queues_with_a_delivery_limit_and_a_dead_letter_queue() -> None:
    settings = Settings(redis_url="redis://h:6379/0", broker_url="amqp://u:p@rabbit:5672//", broker_delivery_limit=3)
    conf = celery_config(settings, REGISTRY)
    assert conf["broker_url"] == "amqp://u:p@rabbit:5672//" and "result_backend" not in conf
    assert conf["worker_detect_quorum_queues"] and conf["broker_transport_options"] == {"confirm_publish": True}
    fraud = {q.name: q for q in conf["task_queues"]}["fraud"]
    assert fraud.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 3,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "fraud.dead",
    }
    assert (fraud.exchange.name, fraud.exchange.type, fraud.routing_key) == ("fraud", "topic", "fraud")
    # kombu copies queues when it binds them; the dead-letter queue must survive the copy to be declared.
    assert copy.copy(fraud).dead_letter.name == "fraud.dead"


@pytest.mark.parametrize(
    ("url", "kind"),
    [("redis://x", "redis"), ("rediss://x", "redis"), ("amqp://x", "amqp"),
     ("amqps://x", "amqp"), ("pyamqp://x", "amqp")],
)  # fmt: skip
def test_broker_kind_follows_the_url_scheme(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


def test_an_unknown_broker_scheme_is_refused_with_the_scheme_named() -> None:
    with pytest.raises(ConfigError, match="'sqs'"):
        celery_config(Settings(broker_url="sqs://queue"), REGISTRY)
    with pytest.raises(ConfigError, match="'sentinel'"):
        celery_config(Settings(broker_url="sentinel://s1:26379"), REGISTRY)


def test_a_rediss_url_makes_celery_and_redis_py_verify_the_certificate(tmp_path: Path) -> None:
    import ssl

    from inferq.protocol.connections import redis_client

    ca = tmp_path / "ca.pem"
    url = "rediss://:secret@redis.example:6380/0"
    config = celery_config(Settings(redis_url=url, redis_tls_ca_file=ca), load_registry(DEFAULT_REGISTRY_PATH))
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    plain = celery_config(Settings(redis_url="redis://:s@h:6379/0"), load_registry(DEFAULT_REGISTRY_PATH))
    assert "broker_use_ssl" not in plain
    # Celery's own app accepts the options for a rediss:// broker.
    app = build_celery(Settings(redis_url=url), load_registry(DEFAULT_REGISTRY_PATH))
    assert app.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    kwargs = redis_client(url, decode=True, ca_file=ca).connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_ca_certs"] == str(ca)


def test_a_decoding_stage_has_tenant_sub_queues_like_its_model() -> None:
    chest = REGISTRY.get_model("chest-xray")
    split = chest.model_copy(update={"name": "xray-split", "preprocess": "separate"})
    registry = Registry({"xray-split": split})
    queues = [q.name for q in celery_config(Settings(tenant_buckets=2), registry)["task_queues"]]
    assert queues == ["xray-split", "xray-split.t1", "xray-split.prep", "xray-split.prep.t1", "inferq-callbacks"]
    assert (entry_task(split), entry_queue(split)) == ("inferq.prep.xray-split", "xray-split.prep")
    assert stage_queue_names(split) == ["xray-split", "xray-split.prep"]
    assert (entry_task(chest), entry_queue(chest)) == ("inferq.infer.chest-xray", "chest-xray")
