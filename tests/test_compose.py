"""docker-compose.yml describes the real deployment; no Docker engine runs here, so it is checked as data."""

from __future__ import annotations

from typing import Any

import yaml

from inferq.producers.cli import main as inferq_cli
from tests.conftest import REPO_ROOT


def _compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def test_the_deployment_has_its_services() -> None:
    services = {"redis", "api", "worker-cpu", "worker-gpu", "reconciler", "callbacks", "flower"}
    assert set(_compose()["services"]) == services


def test_every_inferq_command_exists_with_its_options() -> None:
    for name, service in _compose()["services"].items():
        command = service["command"]
        if name == "redis":
            continue
        assert command[0] == "inferq", name
        subcommand = inferq_cli.commands[command[1]]
        known = {opt for param in subcommand.params for opt in getattr(param, "opts", [])}
        flags = [arg for arg in command[2:] if arg.startswith("--")]
        assert set(flags) <= known, (name, set(flags) - known)


def test_redis_keeps_an_append_only_file_behind_a_password_off_its_command_line() -> None:
    redis = _compose()["services"]["redis"]
    [script] = redis["command"]
    assert redis["entrypoint"] == ["/bin/sh", "-c"]
    assert "exec redis-server /tmp/redis-auth.conf" in script and "umask 077" in script
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    # The password reaches the config file from the environment; no argument of redis-server carries it.
    assert "requirepass" not in script.split("exec", 1)[1] and "PASSWORD" not in script.split("exec", 1)[1]
    assert "ports" not in redis
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_flower_starts_behind_basic_auth_and_the_api_hides_its_docs() -> None:
    services = _compose()["services"]
    assert "INFERQ_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["api"]["environment"]["INFERQ_API_DOCS_ENABLED"] == "false"


def test_the_gpu_worker_reserves_a_gpu_and_published_ports_stay_on_loopback() -> None:
    services = _compose()["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["command"][2:4] == ["--pool", "gpu"]
    for service in services.values():
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def test_every_service_built_from_the_dockerfile_names_a_real_target() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for service in _compose()["services"].values():
        if "build" in service:
            assert f"AS {service['build']['target']}" in dockerfile
