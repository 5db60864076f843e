"""The worker-side commands of `inferq`: `worker` and `predict`. Imported only when one of them runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import torch

from config import Settings
from protocol.codec import TensorPayload
from protocol.errors import InferqError, InvalidRequest, ModelLoadError
from protocol.intake import FileUpload, TensorUpload, validate_input
from protocol.registry import ModelSpec, load_registry
from workers.inference import load_runner
from workers.weights import ensure_generated_weights


def _selected_models(settings: Settings, pool: str, models: list[str] | None) -> list[ModelSpec]:
    registry = load_registry(settings.registry_path)
    specs = registry.select(models) if models else registry.for_pool(pool)
    if not specs:
        raise click.ClickException(f"no model of the registry is declared for the {pool} pool; name some with --models")
    return specs


def run_worker(*, pool: str, models: list[str] | None, concurrency: int | None, loglevel: str) -> None:
    """Start a Celery worker on the models' queues: the same as `celery -A workers.app worker -Q ...`."""
    settings = Settings()
    try:
        specs = _selected_models(settings, pool, models)
    except InferqError as e:
        raise click.ClickException(e.message) from e
    # workers.app builds its settings at import: hand the pool's choices down through its environment. Its start-up
    # hook then checks for CUDA (in a subprocess) before any fork, for this form and the plain `celery` one alike.
    os.environ["INFERQ_DEVICE"] = "cuda" if pool == "gpu" else "cpu"
    processes = concurrency or settings.worker_concurrency
    os.environ["INFERQ_WORKER_CONCURRENCY"] = str(processes)
    queues = ",".join(spec.queue_name for spec in specs)
    argv = ["worker", "-Q", queues, "-n", f"inferq-{pool}-{os.getpid()}@%h", "-c", str(processes), "-l", loglevel]
    # Become the plain Celery command: one code path for both forms, and its exit status (a worker that refused
    # to start exits non-zero) and signals reach the caller unchanged.
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.app", *argv])  # noqa: S606


def _upload_of(spec: ModelSpec, path: Path) -> FileUpload | TensorUpload:
    if spec.input.kind == "image":
        return FileUpload(data=path.read_bytes(), filename=path.name)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return TensorUpload(inputs=[TensorPayload.model_validate(t) for t in document["inputs"]])
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"{path.name}: expected a JSON object with 'inputs' in the OIP form") from e


def predict_files(model: str, files: list[Path]) -> int:
    """Print one result JSON per file (an `{"error": ...}` line for a bad file); the exit status."""
    settings = Settings()
    try:
        spec = load_registry(settings.registry_path).get_model(model)
        ensure_generated_weights(spec, settings)
        runner = load_runner(spec, settings, torch.device("cpu"))
    except (InferqError, ModelLoadError) as e:
        raise click.ClickException(e.message) from e
    status = 0
    for path in files:
        try:
            output: dict[str, Any] = runner.run(validate_input(spec, _upload_of(spec, path), settings).blob)
        except InferqError as e:
            output, status = {"error": e.to_dict()}, 1
        sys.stdout.write(json.dumps(output, separators=(",", ":")) + "\n")
    return status
