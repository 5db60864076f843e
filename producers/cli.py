"""The `inferq` command. Client commands live here and import no torch; the worker commands (`worker`,
`predict`) import worker code inside the command, so a client install without torch still runs the rest."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from config import Settings
from producers.client import FINAL_STATUSES, InferqClient
from protocol.errors import InferqError, RemoteError

_WORKER_EXTRA_HINT = "the worker commands need torch: pip install 'inferq[worker]'"


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _client(settings: Settings) -> InferqClient:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return InferqClient(settings.api_url, api_key=key)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, separators=(",", ":")))


@click.group()
def main() -> None:
    """inferq: asynchronous inference jobs on Celery and Redis."""


def _submit_one(client: InferqClient, model: str, path: Path, options: dict[str, Any]) -> str:
    if path.suffix.lower() == ".json":
        document = json.loads(path.read_text(encoding="utf-8"))
        return client.submit(model, inputs=document["inputs"], **options)
    return client.submit(model, path, **options)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Registry name, e.g. chest-xray.")
@click.option("--wait/--no-wait", default=False, help="Wait for every job and print its outcome.")
@click.option("--timeout-s", default=600.0, show_default=True, help="How long --wait waits for all jobs.")
@click.option("--priority", type=int, default=None)
@click.option("--callback-url", default=None)
@click.option("--api-url", default=None, help="Default: INFERQ_API_URL or http://127.0.0.1:8000.")
def submit(
    files: tuple[Path, ...],
    model: str,
    wait: bool,
    timeout_s: float,
    priority: int | None,
    callback_url: str | None,
    api_url: str | None,
) -> None:
    """Submit FILES (images, or JSON files of OIP inputs) as jobs; print one JSON line per file."""
    settings = _settings(api_url=api_url)
    options = {"priority": priority, "callback_url": callback_url}
    failed = False
    with _client(settings) as client:
        submitted: list[tuple[Path, str]] = []
        for path in tqdm(files, desc="submitting", unit="file", disable=len(files) < 2, file=sys.stderr):
            try:
                submitted.append((path, _submit_one(client, model, path, options)))
            except (RemoteError, ValueError, KeyError) as e:
                failed = True
                _print_json({"file": str(path), "status": "rejected", "error": _error_of(e)})
        if not wait:
            for path, job_id in submitted:
                _print_json({"file": str(path), "job_id": job_id, "status": "queued"})
        else:
            failed |= _wait_all(client, submitted, timeout_s)
    sys.exit(1 if failed else 0)


def _error_of(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, InferqError):
        return exc.to_dict()
    return {"code": "invalid_request", "message": str(exc), "retryable": False}


def _wait_all(client: InferqClient, submitted: list[tuple[Path, str]], timeout_s: float) -> bool:
    """Poll every job until final; print each as it ends. True if any did not succeed."""
    deadline = time.monotonic() + timeout_s
    pending = dict((job_id, path) for path, job_id in submitted)
    failed = False
    with tqdm(total=len(pending), desc="waiting", unit="job", disable=len(pending) < 2, file=sys.stderr) as bar:
        while pending and time.monotonic() < deadline:
            for job_id, path in list(pending.items()):
                job = client.status(job_id)
                if job["status"] in FINAL_STATUSES:
                    del pending[job_id]
                    bar.update(1)
                    failed |= job["status"] != "succeeded"
                    _print_json({"file": str(path), **job})
            time.sleep(0.25 if pending else 0)
    for job_id, path in pending.items():
        _print_json({"file": str(path), "job_id": job_id, "status": "timeout"})
    return failed or bool(pending)


@main.command()
@click.argument("job_id")
@click.option("--api-url", default=None)
def status(job_id: str, api_url: str | None) -> None:
    """Print a job's status and result as JSON."""
    with _client(_settings(api_url=api_url)) as client:
        _run_client(lambda: client.status(job_id))


@main.command()
@click.argument("job_id")
@click.option("--api-url", default=None)
def cancel(job_id: str, api_url: str | None) -> None:
    """Cancel a job that has not started."""
    with _client(_settings(api_url=api_url)) as client:
        _run_client(lambda: client.cancel(job_id))


@main.command()
@click.option("--api-url", default=None)
def models(api_url: str | None) -> None:
    """List the models the API serves, with queue depths."""
    with _client(_settings(api_url=api_url)) as client:
        _run_client(lambda: {"models": client.models()})


def _run_client(call: Any) -> None:
    try:
        _print_json(call())
    except RemoteError as e:
        _print_json({"error": e.to_dict()})
        sys.exit(1)


@main.command()
@click.option("--host", default=None, help="Default: INFERQ_API_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: INFERQ_API_PORT (8000).")
def api(host: str | None, port: int | None) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    from producers.access_log import configure_access_log
    from producers.api import create_app

    settings = _settings(api_host=host, api_port=port)
    configure_access_log(settings.access_log_path)
    # uvicorn's own access log prints query strings; inferq's (producers.access_log) never does.
    uvicorn.run(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info", access_log=False
    )


@main.command()
@click.option("--host", default=None, help="Default: INFERQ_FLOWER_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: INFERQ_FLOWER_PORT (5555).")
def flower(host: str | None, port: int | None) -> None:
    """Start Flower against the same broker, behind basic auth (INFERQ_FLOWER_BASIC_AUTH), control API off."""
    from producers.flower import run_flower

    settings = _settings(flower_host=host, flower_port=port)
    try:
        run_flower(settings)
    except InferqError as e:
        raise click.ClickException(e.message) from e


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored in Redis as hashes only)."""


def _key_store() -> Any:
    from producers.api_keys import ApiKeyStore
    from protocol.connections import redis_client

    settings = Settings()
    return ApiKeyStore(redis_client(settings.redis_url_or_default, decode=True, ca_file=settings.redis_tls_ca_file))


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for, e.g. a hospital or department.")
@click.option("--roles", required=True, help="Comma-separated: submit, read, admin.")
def keys_create(tenant: str, roles: str) -> None:
    """Create a key; it is printed once, alone on the last line, and cannot be shown again."""
    from producers.api_keys import parse_roles

    try:
        issued = _key_store().create(tenant, parse_roles(roles))
    except InferqError as e:
        raise click.ClickException(e.message) from e
    p = issued.principal
    click.echo(f"created key {p.key_id} for tenant {p.tenant} with roles {','.join(sorted(p.roles))}")
    click.echo("store it now: only its hash is kept, so it cannot be shown again")
    click.echo(issued.key)


@keys.command("list")
def keys_list() -> None:
    """One JSON line per key: id, tenant, roles, created_at (never the key)."""
    for row in _key_store().list():
        _print_json(row)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; requests with it are refused from the next one on."""
    if not _key_store().revoke(key_id):
        raise click.ClickException(f"no key with id {key_id!r}")
    click.echo(f"revoked key {key_id}")


def _worker_cli() -> Any:
    try:
        return importlib.import_module("workers.cli")
    except ModuleNotFoundError as e:
        raise click.ClickException(f"{_WORKER_EXTRA_HINT} ({e.name} is missing)") from e


@main.command()
@click.option("--pool", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--models", "model_names", default=None, help="Comma-separated; default: the pool's models.")
@click.option("--concurrency", type=int, default=None, help="Worker processes (default INFERQ_WORKER_CONCURRENCY).")
@click.option("--loglevel", default="info", show_default=True)
def worker(pool: str, model_names: str | None, concurrency: int | None, loglevel: str) -> None:
    """Start a Celery worker consuming the models' queues."""
    names = [n.strip() for n in model_names.split(",") if n.strip()] if model_names else None
    _worker_cli().run_worker(pool=pool, models=names, concurrency=concurrency, loglevel=loglevel)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True)
def predict(files: tuple[Path, ...], model: str) -> None:
    """Run a model in this process, no queue: print the result JSON a served job gives, one line per file."""
    sys.exit(_worker_cli().predict_files(model, list(files)))


@main.command()
@click.option("--exit-after-samples", is_flag=True, help="Stop once the samples are done (scripts, tests).")
def demo(exit_after_samples: bool) -> None:
    """Start Redis (unless configured), a worker, the API and Flower; submit sample X-rays; print findings."""
    from producers.demo import run_demo

    sys.exit(run_demo(Settings(), stay_up=not exit_after_samples))


if __name__ == "__main__":
    main()
