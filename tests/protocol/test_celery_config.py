"""Celery's configuration carries the guarantees later issues build on."""

from __future__ import annotations

from pathlib import Path

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


def test_a_rediss_url_makes_celery_and_redis_py_verify_the_certificate(tmp_path: Path) -> None:
    import ssl

    from protocol.connections import redis_client

    ca = tmp_path / "ca.pem"
    url = "rediss://:secret@redis.example:6380/0"
    config = celery_config(Settings(redis_url=url, redis_tls_ca_file=ca), load_registry(DEFAULT_REGISTRY_PATH))
    for name in ("broker_use_ssl", "redis_backend_use_ssl"):
        assert config[name] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    plain = celery_config(Settings(redis_url="redis://:s@h:6379/0"), load_registry(DEFAULT_REGISTRY_PATH))
    assert "broker_use_ssl" not in plain and "redis_backend_use_ssl" not in plain
    # Celery's own app accepts the options for a rediss:// backend (it refuses one without ssl_cert_reqs).
    app = build_celery(Settings(redis_url=url), load_registry(DEFAULT_REGISTRY_PATH))
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    kwargs = redis_client(url, decode=True, ca_file=ca).connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_ca_certs"] == str(ca)
