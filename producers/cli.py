"""The `inferq` command. Client commands live here and import no torch; the worker commands (`worker`,
`predict`) import worker code inside the command, so a client install without torch still runs the rest."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from inferq.config import Settings
from inferq.producers.client import FINAL_STATUSES, InferqClient
from inferq.protocol.errors import InferqError, RemoteError
from inferq.protocol.priority import PRIORITY_HELP

_WORKER_EXTRA_HINT = "the worker commands need torch: pip install 'inferq[worker]'"


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _client(settings: Settings) -> InferqClient:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return InferqClient(settings.api_url, api_key=key)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, separators=(",", ":")))


class _Commands(click.Group):
    """The command group; a command whose extra is not installed says which to install instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            hint = (
                "pip install 'inferq[worker]'" if e.name in ("torch", "safetensors") else "pip install 'inferq[server]'"
            )
            raise click.ClickException(
                f"`inferq {ctx.invoked_subcommand}` needs {e.name}, which is not installed: {hint}"
            ) from e


@click.group(cls=_Commands)
def main() -> None:
    """inferq: asynchronous inference jobs on Celery and Redis."""


def _expand(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given, and the files under each folder (recursively, hidden ones left out), in name order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = (p for p in path.rglob("*") if p.is_file())
            files += sorted(p for p in inside if not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files.append(path)
    return files


def _read_inputs(path: Path) -> list[dict[str, Any]]:
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise ValueError(f"{path.name}: a JSON file must hold {{'inputs': [...]}}")
    return list(document["inputs"])


def _submit_files(client: InferqClient, model: str, files: list[Path], options: dict[str, Any]) -> list[Any]:
    """Submit in bulk requests: JSON files as tensor jobs, any other file as an image. One entry per file, in
    order: the job id, or the error that refused it."""
    outcomes: list[Any] = [None] * len(files)
    tensors: list[tuple[int, list[dict[str, Any]]]] = []
    for index, path in enumerate(files):
        if path.suffix.lower() == ".json":
            try:
                tensors.append((index, _read_inputs(path)))
            except (ValueError, OSError) as e:
                outcomes[index] = _error_of(e)
    images = [i for i, path in enumerate(files) if path.suffix.lower() != ".json"]
    try:
        if tensors:
            entries = client.submit_many(model, inputs=[inputs for _, inputs in tensors], **options)
            for (index, _), entry in zip(tensors, entries, strict=True):
                outcomes[index] = entry.get("job_id") or entry["error"]
        if images:
            entries = client.submit_many(model, [files[i] for i in images], **options)
            for index, entry in zip(images, entries, strict=True):
                outcomes[index] = entry.get("job_id") or entry["error"]
    except RemoteError as e:
        outcomes = [o if o is not None else e.to_dict() for o in outcomes]
    return outcomes


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", required=True, help="Registry name, e.g. chest-xray.")
@click.option("--wait/--no-wait", default=False, help="Wait for every job and print its outcome.")
@click.option("--timeout-s", default=600.0, show_default=True, help="How long --wait waits for all jobs.")
@click.option("--priority", default=None, help=PRIORITY_HELP)
@click.option("--callback-url", default=None)
@click.option("--api-url", default=None, help="Default: INFERQ_API_URL or http://127.0.0.1:8000.")
def submit(
    paths: tuple[Path, ...],
    model: str,
    wait: bool,
    timeout_s: float,
    priority: str | None,
    callback_url: str | None,
    api_url: str | None,
) -> None:
    """Submit files or folders of files (images, or JSON files of OIP inputs) as jobs, in bulk requests; print
    one JSON line per file."""
    settings = _settings(api_url=api_url)
    options = {"priority": priority, "callback_url": callback_url}
    files = _expand(paths)
    failed = False
    with _client(settings) as client:
        submitted: list[tuple[Path, str]] = []
        for path, outcome in zip(files, _submit_files(client, model, files, options), strict=True):
            if isinstance(outcome, str):
                submitted.append((path, outcome))
            else:
                failed = True
                _print_json({"file": str(path), "status": "rejected", "error": outcome})
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
    """Long-poll the jobs, printing each as it ends. True if any did not succeed or did not end in time."""
    deadline = time.monotonic() + timeout_s
    pending = {job_id: path for path, job_id in submitted}
    failed = False
    with tqdm(total=len(pending), desc="waiting", unit="job", disable=len(pending) < 2, file=sys.stderr) as bar:
        while pending and (remaining_s := deadline - time.monotonic()) > 0:
            for job in client.results(list(pending), wait_s=remaining_s, until="any"):
                if job.get("status") in FINAL_STATUSES or "status" not in job:
                    path = pending.pop(job["job_id"])
                    bar.update(1)
                    failed |= job.get("status") != "succeeded"
                    _print_json({"file": str(path), **job})
    for job_id, path in pending.items():
        _print_json({"file": str(path), "job_id": job_id, "status": "timeout"})
    return failed or bool(pending)


@main.command()
@click.argument("job_id", required=False)
@click.option("--api-url", default=None)
@click.option("--minutes", default=5, show_default=True, help="Without a job id: count failures over this window.")
def status(job_id: str | None, api_url: str | None, minutes: int) -> None:
    """With a job id: the job's status and result as JSON (through the API). Without: every queue's depth, oldest
    waiting job, running jobs, live workers and recent failures, read from Redis (INFERQ_REDIS_URL)."""
    if job_id is None:
        import redis  # an operator command, of the server install: the client install has no Redis library

        from inferq.producers.metrics import render_status, status_rows

        try:
            click.echo(render_status(status_rows(Settings(), minutes=minutes), minutes=minutes))
        except redis.RedisError as e:
            raise click.ClickException(f"Redis does not answer ({type(e).__name__}); check INFERQ_REDIS_URL") from e
        return
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

    from inferq.producers.access_log import configure_access_log
    from inferq.producers.api import create_app
    from inferq.producers.open_files import raise_open_files_limit
    from inferq.protocol.logs import configure_logging

    settings = _settings(api_host=host, api_port=port)
    configure_logging(settings)
    configure_access_log(settings.access_log_path)
    # Each waiting client holds a connection: a soft limit of 1,024 open files would cap them far below the hard one.
    open_files = raise_open_files_limit()
    logging.getLogger(__name__).info("open-file limit: %s", open_files or "unlimited")
    # uvicorn's own access log prints query strings; inferq's (producers.access_log) never does. Its other loggers
    # are left unconfigured (log_config=None) so that their lines reach the root handler, in inferq's format.
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
        access_log=False,
        log_config=None,
    )


@main.command()
@click.option("--host", default=None, help="Default: INFERQ_FLOWER_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: INFERQ_FLOWER_PORT (5555).")
def flower(host: str | None, port: int | None) -> None:
    """Start Flower against the same broker, behind basic auth (INFERQ_FLOWER_BASIC_AUTH), control API off."""
    from inferq.producers.flower import run_flower

    settings = _settings(flower_host=host, flower_port=port)
    try:
        run_flower(settings)
    except InferqError as e:
        raise click.ClickException(e.message) from e


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored in Redis as hashes only)."""


def _key_store() -> Any:
    from inferq.producers.api_keys import ApiKeyStore
    from inferq.protocol.connections import redis_client

    settings = Settings()
    return ApiKeyStore(redis_client(settings.redis_url_or_default, decode=True, ca_file=settings.redis_tls_ca_file))


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for, e.g. a hospital or department.")
@click.option("--roles", required=True, help="Comma-separated: submit, read, admin.")
def keys_create(tenant: str, roles: str) -> None:
    """Create a key; it is printed once, alone on the last line, and cannot be shown again."""
    from inferq.producers.api_keys import parse_roles

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
        return importlib.import_module("inferq.workers.cli")
    except ModuleNotFoundError as e:
        raise click.ClickException(f"{_WORKER_EXTRA_HINT} ({e.name} is missing)") from e


@main.command()
@click.option("--pool", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--models", "model_names", default=None, help="Comma-separated; default: the pool's models.")
@click.option("--processes", type=int, default=None, help="Worker processes (default: one per usable CPU).")
@click.option("--concurrency", type=int, default=None, help="Alias of --processes.")
@click.option("--threads", type=int, default=None, help="Torch threads per process (default 1).")
@click.option("--gpus", default=None, help="Comma-separated CUDA devices, one worker process each (gpu pool).")
@click.option(
    "--stage",
    type=click.Choice(["all", "model", "prep"]),
    default="all",
    show_default=True,
    help='For models with preprocess = "separate": prep decodes (CPU), model runs the model (GPU), all does both.',
)
@click.option("--loglevel", default="info", show_default=True)
def worker(
    pool: str,
    model_names: str | None,
    processes: int | None,
    concurrency: int | None,
    threads: int | None,
    gpus: str | None,
    stage: str,
    loglevel: str,
) -> None:
    """Start worker processes consuming the models' queues; each batches the jobs it holds."""
    names = _split(model_names)
    status = _worker_cli().run_worker(
        pool=pool,
        models=names,
        processes=processes or concurrency,
        threads=threads,
        gpus=_split(gpus),
        loglevel=loglevel,
        stage=stage,
    )
    sys.exit(status)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


@main.command()
@click.option("--once", is_flag=True, help="Run one pass and print what it did.")
def reconciler(once: bool) -> None:
    """Recover jobs of dead workers, lost messages and retries; expire late jobs. Safe to run many."""
    from inferq.producers.operations import run_reconciler

    sys.exit(run_reconciler(Settings(), once=once))


@main.command()
@click.option("--threads", type=int, default=8, show_default=True, help="Deliveries in flight at once.")
@click.option("--loglevel", default="info", show_default=True)
def callbacks(threads: int, loglevel: str) -> None:
    """Deliver job callbacks (a torch-free Celery worker on the inferq-callbacks queue)."""
    from inferq.protocol.keys import CALLBACK_QUEUE

    argv = [sys.executable, "-m", "celery", "-A", "inferq.producers.celery_app", "worker", "-Q", CALLBACK_QUEUE]
    argv += ["-P", "threads", "-c", str(threads), "-n", f"inferq-callbacks-{os.getpid()}@%h", "-l", loglevel]
    argv += ["--without-mingle", "--without-gossip"]
    os.execv(sys.executable, argv)  # noqa: S606


@main.group(name="dead-letter")
def dead_letter() -> None:
    """Jobs that used up their attempts (no patient data is shown)."""


@dead_letter.command(name="list")
def dead_letter_list() -> None:
    """One JSON line per dead-lettered job."""
    from inferq.producers.operations import dead_letter_rows

    for row in dead_letter_rows(Settings()):
        _print_json(row)


@dead_letter.command(name="requeue")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every dead-lettered job.")
def dead_letter_requeue(job_ids: tuple[str, ...], requeue_all: bool) -> None:
    """Put dead-lettered jobs back in their queue with fresh attempts."""
    from inferq.producers.operations import requeue_dead_letters

    outcomes = requeue_dead_letters(Settings(), list(job_ids), everything=requeue_all)
    for job_id, outcome in outcomes.items():
        _print_json({"job_id": job_id, "requeue": outcome})
    sys.exit(0 if all(o == "ok" for o in outcomes.values()) else 1)


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
    from inferq.producers.demo import run_demo

    sys.exit(run_demo(Settings(), stay_up=not exit_after_samples))


if __name__ == "__main__":
    main()
