"""`inferq keys` and `inferq flower` from the shell, against the test Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from inferq.config import Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.flower import CONTROL_ROUTE_PREFIXES
from inferq.producers.redis_server import free_port
from inferq.producers.stack import ServiceStack
from inferq.protocol.celery_config import build_celery
from inferq.protocol.connections import redis_client
from inferq.protocol.keys import flower_journal_key
from inferq.protocol.registry import load_registry
from tests.conftest import dump_redis


def _inferq(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFERQ_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "inferq.producers.cli", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_keys_create_prints_the_key_alone_on_the_last_line_then_list_and_revoke(redis_url: str) -> None:
    created = _inferq(redis_url, "keys", "create", "--tenant", "radiology", "--roles", "submit,read")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    store = ApiKeyStore(redis_client(redis_url, decode=True))
    principal = store.authenticate(key)
    assert principal.tenant == "radiology" and principal.roles == {"submit", "read"}
    assert key.encode() not in dump_redis(redis_url)

    listed = _inferq(redis_url, "keys", "list")
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["key_id"] == principal.key_id and row["roles"] == "read,submit" and key not in listed.stdout

    assert _inferq(redis_url, "keys", "revoke", principal.key_id).returncode == 0
    assert _inferq(redis_url, "keys", "list").stdout == ""
    again = _inferq(redis_url, "keys", "revoke", principal.key_id)
    assert again.returncode != 0 and "no key" in again.stderr


def test_keys_create_refuses_an_unknown_role(redis_url: str) -> None:
    done = _inferq(redis_url, "keys", "create", "--tenant", "radiology", "--roles", "superuser")
    assert done.returncode != 0 and "roles must be" in done.stderr


def test_flower_refuses_to_start_without_credentials(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_FLOWER_BASIC_AUTH"}
    env |= {"INFERQ_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "inferq.producers.cli", "flower"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "INFERQ_FLOWER_BASIC_AUTH" in done.stderr


def test_flower_asks_for_credentials_and_has_no_control_api(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "INFERQ_REDIS_URL": redis_url, "INFERQ_FLOWER_PORT": str(port)}
    env["INFERQ_FLOWER_BASIC_AUTH"] = "officer:correct-horse"
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    base = f"http://127.0.0.1:{port}"
    with ServiceStack(env, tmp_path) as services:
        process = services.start("flower", "flower")
        services.wait_http(f"{base}/healthcheck", timeout_s=60)
        login = ("officer", "correct-horse")
        assert httpx.get(f"{base}/").status_code == 401
        assert httpx.get(f"{base}/", auth=("officer", "wrong")).status_code == 401
        assert httpx.get(f"{base}/api/workers").status_code == 401
        assert httpx.get(f"{base}/", auth=login).status_code == 200
        assert httpx.get(f"{base}/api/workers", auth=login).status_code == 200
        for prefix in CONTROL_ROUTE_PREFIXES:
            response = httpx.post(f"{base}{prefix}celery@anywhere", auth=login)
            assert response.status_code == 404, prefix
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"correct-horse" not in cmdline
        # Not Flower's own persistent mode: its state file would be a shelve (pickle), so none is written.
        assert not list(tmp_path.rglob("flower.db*"))


def _flower_tasks(base: str, login: tuple[str, str], task_id: str, *, timeout_s: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{base}/api/tasks", auth=login, timeout=10).json()
        if task_id in tasks and tasks[task_id].get("state") == "SUCCESS":
            return dict(tasks[task_id])
        time.sleep(0.3)
    raise AssertionError(f"Flower never showed task {task_id} as done")


def test_flower_keeps_its_tasks_across_a_restart_without_pickle(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "INFERQ_REDIS_URL": redis_url, "INFERQ_FLOWER_PORT": str(port)}
    env["INFERQ_FLOWER_BASIC_AUTH"] = "officer:correct-horse"
    env["INFERQ_DATA_DIR"] = str(tmp_path / "data")
    base, login = f"http://127.0.0.1:{port}", ("officer", "correct-horse")
    app = build_celery(Settings(redis_url=redis_url), load_registry(Settings().registry_path))
    task_id = uuid.uuid4().hex
    with ServiceStack(env, tmp_path) as services:
        services.start("flower", "flower")
        services.wait_http(f"{base}/healthcheck", timeout_s=60)
        # Given a task's life, sent as a worker sends its events
        with app.events.default_dispatcher(hostname="inferq-cpu-0@test") as dispatcher:
            time.sleep(1.0)  # Flower subscribes to the event channel just after it answers
            dispatcher.send("task-received", uuid=task_id, name="inferq.infer.fraud", args="['job']", kwargs="{}")
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, result="{'status': 'succeeded'}", runtime=0.01)
        assert _flower_tasks(base, login, task_id)["name"] == "inferq.infer.fraud"
        # When Flower restarts
        services.stop()
        journal = redis_client(redis_url, decode=True).xrange(flower_journal_key())
        assert len(journal) >= 3 and all(json.loads(fields["event"])["type"] for _, fields in journal)
        services.start("flower", "flower")
        services.wait_http(f"{base}/healthcheck", timeout_s=60)
        # Then it still shows the task, restored from the journal (JSON in Redis), with no shelve file anywhere
        restored = _flower_tasks(base, login, task_id, timeout_s=5.0)
        assert restored["name"] == "inferq.infer.fraud" and restored["worker"] == "inferq-cpu-0@test"
    assert not list(tmp_path.rglob("flower.db*")) and not list(Path.cwd().glob("flower.db*"))
