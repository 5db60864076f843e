"""`inferq keys` and `inferq flower` from the shell, against the test Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.flower import CONTROL_ROUTE_PREFIXES
from inferq.producers.redis_server import free_port
from inferq.producers.stack import ServiceStack
from inferq.protocol.connections import redis_client
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
        # Not persistent mode: Flower's state file would be a shelve (pickle), so none is written.
        assert not list(tmp_path.rglob("flower.db*"))
