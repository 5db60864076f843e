"""`inferq demo`: the whole system on one host. Starts a private Redis (unless one is configured), one CPU worker,
the HTTP API and Flower; submits sample chest X-rays and a fraud tensor over HTTP; prints the findings."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from inferq.config import Settings
from inferq.producers.api_keys import ApiKeyStore
from inferq.producers.client import InferqClient
from inferq.producers.redis_server import EmbeddedRedis, free_port, port_is_free
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.protocol.connections import redact_url, redis_client
from inferq.protocol.errors import InferqError

_API_READY_TIMEOUT_S = 90.0
_JOBS_TIMEOUT_S = 900.0
_TOP_FINDINGS = 3
_FRAUD_FEATURES = 30


def _port(host: str, wanted: int) -> int:
    return wanted if wanted and port_is_free(host, wanted) else free_port(host)


def fraud_example(rows: int = 3) -> list[dict[str, Any]]:
    """Deterministic example transactions in the OIP form: time, 28 PCA components, amount."""
    # Standardised features, as the model expects them (the bank scales time and amount before sending).
    features = np.random.default_rng(7).standard_normal((rows, _FRAUD_FEATURES)).astype(np.float32)
    data = [round(float(v), 4) for v in features.reshape(-1)]
    return [{"name": "transactions", "shape": [rows, _FRAUD_FEATURES], "datatype": "FP32", "data": data}]


def _demo_key(settings: Settings, redis_url: str) -> str:
    """A key of the tenant `demo` for this run, created in Redis (only its hash is kept) and printed once."""
    client = redis_client(redis_url, decode=True, ca_file=settings.redis_tls_ca_file)
    try:
        issued = ApiKeyStore(client).create("demo", frozenset({"submit", "read"}))
    finally:
        client.close()
    print(f"API key (tenant demo, roles submit,read; revoke with `inferq keys revoke {issued.principal.key_id}`):")
    print(f"  {issued.key}")
    return issued.key


def _flower_credentials(settings: Settings) -> str:
    if settings.flower_basic_auth is not None:
        return settings.flower_basic_auth.get_secret_value()
    return f"demo:{secrets.token_urlsafe(12)}"


def _service_env(settings: Settings, redis_url: str, api_port: int, flower_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_API_HOST": settings.api_host,
        "INFERQ_API_PORT": str(api_port),
        "INFERQ_FLOWER_HOST": settings.flower_host,
        "INFERQ_FLOWER_PORT": str(flower_port),
        "INFERQ_REGISTRY_PATH": str(settings.registry_path),
        "INFERQ_MODELS_DIR": str(settings.models_dir),
        # Callbacks are signed; the demo makes a secret for this run unless one is configured.
        "INFERQ_CALLBACK_SECRET": _callback_secret(settings),
        # The demo is watched by a person: plain text lines, not JSON.
        "INFERQ_LOG_FORMAT": "text",
    }


def _callback_secret(settings: Settings) -> str:
    if settings.callback_secret is not None:
        return settings.callback_secret.get_secret_value()
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _submit_samples(client: InferqClient, samples: list[Path]) -> list[tuple[str, str]]:
    jobs = [(path.name, client.submit("chest-xray", path)) for path in samples]
    jobs.append(("fraud: 3 transactions", client.submit("fraud", inputs=fraud_example())))
    return jobs


def _wait(client: InferqClient, jobs: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    deadline = time.monotonic() + _JOBS_TIMEOUT_S
    return [(name, client.result(job_id, wait_s=max(0.0, deadline - time.monotonic()))) for name, job_id in jobs]


def _summary(job: dict[str, Any]) -> tuple[str, str]:
    result = job.get("result") or {}
    if job["status"] != "succeeded":
        return (job.get("error") or {}).get("code", job["status"]), ""
    if "findings" in result:
        top = sorted(result["findings"], key=lambda f: -f["probability"])[:_TOP_FINDINGS]
        image = result["image"]
        picture = f"{image['columns']}x{image['rows']} {image.get('modality') or image['format']}"
        return ", ".join(f"{f['label']} {f['probability']:.3f}" for f in top), picture
    scores = result["outputs"][0]["data"]
    return "fraud probability " + ", ".join(f"{s:.3f}" for s in scores), "tensor"


def print_table(results: list[tuple[str, dict[str, Any]]]) -> None:
    rows = [("input", "status", "picture", f"top {_TOP_FINDINGS} findings")]
    for name, job in results:
        findings, picture = _summary(job)
        rows.append((name, job["status"], picture, findings))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])


def _wait_for_interrupt(stack: ServiceStack) -> None:
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while not stop["now"] and not stack.dead():
        time.sleep(0.5)
    if stack.dead():
        print(f"stopping: {', '.join(stack.dead())} exited; logs in {stack.log_dir}")


def run_demo(settings: Settings, *, stay_up: bool) -> int:
    data_dir = settings.data_dir.resolve()
    with ExitStack() as resources:
        if settings.redis_url is None:
            redis_url = resources.enter_context(EmbeddedRedis(data_dir / "redis")).url
            print(f"started a private Redis at {redact_url(redis_url)} (AOF in {data_dir / 'redis'})")
        else:
            redis_url = settings.redis_url.get_secret_value()
            print(f"using the configured Redis at {redact_url(redis_url)}")
        api_port = _port(settings.api_host, settings.api_port)
        flower_port = _port(settings.flower_host, settings.flower_port)
        api_key = _demo_key(settings, redis_url)
        flower_login = _flower_credentials(settings)
        env = _service_env(settings, redis_url, api_port, flower_port) | {"INFERQ_FLOWER_BASIC_AUTH": flower_login}
        stack = resources.enter_context(ServiceStack(env, data_dir / "logs"))
        # The worker's defaults, as a user gets them: one single-threaded process per usable CPU.
        stack.start("worker", "worker", "--pool", "cpu", "--models", "chest-xray,fraud")
        stack.start("api", "api")
        stack.start("reconciler", "reconciler")
        stack.start("callbacks", "callbacks")
        stack.start("flower", "flower")
        api_url = f"http://{settings.api_host}:{api_port}"
        flower_url = f"http://{settings.flower_host}:{flower_port}"
        print(f"services starting; logs in {stack.log_dir}")
        try:
            stack.wait_http(f"{api_url}/readyz", timeout_s=_API_READY_TIMEOUT_S)
            stack.wait_http(f"{flower_url}/healthcheck", timeout_s=_API_READY_TIMEOUT_S)
            samples = write_samples(data_dir / "samples")
            with InferqClient(api_url, api_key=api_key) as client:
                jobs = _submit_samples(client, samples)
                print(f"submitted {len(jobs)} jobs; waiting for the worker (the first job waits for model warm-up)")
                results = _wait(client, jobs)
        except (InferqError, TimeoutError) as e:
            print(f"demo failed: {e}; logs in {stack.log_dir}")
            return 1
        print()
        print_table(results)
        print('\nThe models are UNTRAINED ("trained": false): their numbers mean nothing medically or financially.')
        print(f"API docs: {api_url}/docs")
        print(
            f"Flower:   {flower_url} (user {flower_login.partition(':')[0]}, password {flower_login.partition(':')[2]})"
        )
        if stay_up:
            print("Press Ctrl-C to stop.")
            _wait_for_interrupt(stack)
        return 0 if all(job["status"] == "succeeded" for _, job in results) else 1
    return 1
