"""The Kubernetes manifests parse, run commands the `inferq` CLI has, scale the registry's queues, and agree with
docker-compose.yml on images and environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from inferq.config import DEFAULT_REGISTRY_PATH
from inferq.producers.cli import main as cli_main
from inferq.protocol.keys import queue_for
from inferq.protocol.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The subcommands the manifests run; every one must exist in the CLI.
MANIFEST_COMMANDS = {"api", "worker", "flower", "reconciler", "callbacks"}
ALLOWED_MISSING: set[str] = set()
# Dockerfile targets as compose builds them, and the image names the manifests use for them.
IMAGE_FOR_TARGET = {"client": "inferq-client", "worker": "inferq-worker"}
# The inferq services of docker-compose.yml, each compared with the Deployment of the same name.
COMPARED_SERVICES = ["api", "worker-cpu", "worker-gpu", "reconciler", "callbacks", "flower"]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_documents() -> dict[str, list[dict[str, Any]]]:
    return {path.name: _documents(path) for path in sorted(KUBERNETES.glob("*.yaml"))}


def _kind(kind: str, files: list[str] | None = None) -> list[dict[str, Any]]:
    found = _all_documents()
    return [
        doc for name, docs in found.items() if files is None or name in files for doc in docs if doc["kind"] == kind
    ]


def _containers() -> dict[str, dict[str, Any]]:
    workloads = _kind("Deployment") + _kind("StatefulSet")
    return {w["metadata"]["name"]: c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]}


def _inferq_containers() -> dict[str, dict[str, Any]]:
    return {name: c for name, c in _containers().items() if c["command"][0] == "inferq"}


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_manifest_parses_and_kustomize_lists_what_is_there() -> None:
    documents = _all_documents()
    assert all(doc.get("apiVersion") and doc.get("kind") for docs in documents.values() for doc in docs)
    [kustomization] = documents["kustomization.yaml"]
    resources = set(kustomization["resources"])
    assert all((KUBERNETES / name).is_file() for name in resources)
    # Not applied by default: a placeholder Secret and the RabbitMQ variant of the scalers.
    assert set(documents) - resources == {"kustomization.yaml", "secret.example.yaml", "keda-rabbitmq.yaml"}


def test_the_manifests_run_commands_the_cli_has() -> None:
    assert isinstance(cli_main, click.Group)
    used = {c["command"][1] for c in _inferq_containers().values()}
    assert used == MANIFEST_COMMANDS
    missing = used - set(cli_main.commands)
    assert missing <= ALLOWED_MISSING, f"manifests run `inferq {sorted(missing)}`, which the CLI does not have"
    for container in _inferq_containers().values():
        command = cli_main.commands.get(container["command"][1])
        if command is not None:  # options of the commands that exist are real options
            known = {opt for param in command.params for opt in getattr(param, "opts", [])}
            assert {arg for arg in container["command"][2:] if arg.startswith("--")} <= known, container["command"]


def test_every_model_queue_has_a_scaler_that_scales_its_consumer() -> None:
    registry = load_registry(DEFAULT_REGISTRY_PATH)
    queues = {queue_for(spec.queue_name) for spec in registry.values()}
    containers = _containers()
    for variant, trigger_type, queue_key in (("keda.yaml", "redis", "listName"), ("keda-rabbitmq.yaml", "rabbitmq",
                                                                                   "queueName")):  # fmt: skip
        scalers = _kind("ScaledObject", [variant])
        named = {t["metadata"][queue_key] for s in scalers for t in s["spec"]["triggers"] if t["type"] == trigger_type}
        assert named == queues, variant
        for scaler in scalers:
            [queue] = [t["metadata"][queue_key] for t in scaler["spec"]["triggers"] if t["type"] == trigger_type]
            [load] = [t["metadata"]["query"] for t in scaler["spec"]["triggers"] if t["type"] == "prometheus"]
            assert load == f'max(inferq_model_load{{model="{queue}"}})'
            command = containers[scaler["spec"]["scaleTargetRef"]["name"]]["command"]
            assert queue in command[command.index("--models") + 1].split(","), (variant, queue, command)


def test_the_gpu_worker_requests_a_gpu_and_the_api_has_probes() -> None:
    containers = _containers()
    gpu = containers["worker-gpu"]
    assert gpu["command"][gpu["command"].index("--pool") + 1] == "gpu"
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(containers["worker-cpu"]["resources"])
    api = containers["api"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Not /readyz: a model without workers must not take the API pods (and every other model) out of service.
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_redis_keeps_its_data_refuses_eviction_and_takes_its_password_from_a_secret() -> None:
    [redis] = _kind("StatefulSet")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    [password] = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_every_inferq_service_of_compose_has_a_manifest_and_no_more() -> None:
    # The comparison below is by name: a service compose gains must gain its manifest (and its entry there) too.
    built = {name for name, service in _compose()["services"].items() if "build" in service}
    assert built == set(_inferq_containers()) == set(COMPARED_SERVICES)


@pytest.mark.parametrize("service", COMPARED_SERVICES)
def test_compose_and_kubernetes_run_the_same_command_image_and_environment(service: str) -> None:
    composed = _compose()["services"][service]
    container = _inferq_containers()[service]
    assert container["command"] == composed["command"]
    assert container["image"] == IMAGE_FOR_TARGET[composed["build"]["target"]]
    environment = composed["environment"]
    names = set(environment) if isinstance(environment, dict) else {e.split("=")[0] for e in environment}
    set_here = {e["name"] for e in container["env"]}
    assert names <= set_here, names - set_here
    [url] = [e["value"] for e in container["env"] if e["name"] == "INFERQ_REDIS_URL"]
    assert url == "redis://:$(INFERQ_REDIS_PASSWORD)@redis:6379/0"  # compose: redis://:PASSWORD@redis:6379/0


def test_every_inferq_container_reaches_redis_with_the_secret_password() -> None:
    for name, container in _inferq_containers().items():
        env = {e["name"]: e for e in container["env"]}
        assert env["INFERQ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "inferq", "key": "redis-password"}
        # Kubernetes expands $(VAR) only from variables defined earlier in the list.
        names = [e["name"] for e in container["env"]]
        assert names.index("INFERQ_REDIS_PASSWORD") < names.index("INFERQ_REDIS_URL"), name
        assert container["image"] in IMAGE_FOR_TARGET.values()
