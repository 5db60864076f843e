"""The worker-side commands of `inferq`: `worker` and `predict`. Imported only when one of them runs."""

from __future__ import annotations

import json
import shutil
import sys
from os import EX_CONFIG
from pathlib import Path
from typing import Any

import click
import torch

from inferq.config import Settings
from inferq.protocol.celery_config import default_slots
from inferq.protocol.codec import TensorPayload
from inferq.protocol.errors import InferqError, InvalidRequest, ModelLoadError
from inferq.protocol.intake import FileUpload, TensorUpload, validate_input
from inferq.protocol.registry import ModelSpec, load_registry
from inferq.workers.core_share import create_share
from inferq.workers.inference import load_runner
from inferq.workers.layout import default_processes, usable_cpus
from inferq.workers.runtime import require_cuda
from inferq.workers.supervisor import Supervisor, node_specs
from inferq.workers.weights import ensure_generated_weights


def _selected_models(settings: Settings, pool: str, models: list[str] | None) -> list[ModelSpec]:
    registry = load_registry(settings.registry_path)
    specs = registry.select(models) if models else registry.for_pool(pool)
    if not specs:
        raise click.ClickException(f"no model of the registry is declared for the {pool} pool; name some with --models")
    return specs


def run_worker(
    *,
    pool: str,
    models: list[str] | None,
    processes: int | None,
    threads: int | None,
    gpus: list[str] | None,
    loglevel: str,
    stage: str = "all",
) -> int:
    """Run one Celery node per usable CPU (or per GPU) on the models' queues, until SIGTERM; the exit status."""
    settings = Settings()
    try:
        specs = _selected_models(settings, pool, models)
        if pool == "gpu":
            require_cuda()
    except InferqError as e:
        # Say why and exit non-zero, as the plain `celery -A inferq.workers.app worker` form does.
        print(f"inferq worker cannot start: {e.message}", file=sys.stderr, flush=True)
        return EX_CONFIG
    if not stage_queues(specs, stage):
        print(f"inferq worker cannot start: none of these models has a {stage} stage of its own", file=sys.stderr)
        return EX_CONFIG
    torch_threads = threads or settings.torch_threads or 1
    count = processes or settings.worker_processes or default_processes(threads_per_process=torch_threads)
    if pool == "gpu" and not gpus:
        gpus = ["0"]
    lend = pool == "cpu" and count > 1 and settings.lend_idle_cores
    core_share = create_share(count) if lend else None
    nodes = node_specs(
        pool=pool,
        queues=stage_queues(specs, stage),
        processes=count,
        torch_threads=torch_threads,
        slots=settings.worker_slots or default_slots(specs),
        loglevel=loglevel,
        gpus=gpus,
        core_share=core_share,
    )
    lending = ", idle cores lent to a lone job" if core_share else ""
    print(
        f"inferq worker: {len(nodes)} node(s) x {torch_threads} torch thread(s) on {usable_cpus()} usable CPU(s)"
        + lending
    )
    try:
        supervisor = Supervisor(
            nodes, metrics_host=settings.worker_metrics_host, metrics_port=settings.worker_metrics_port
        )
        return supervisor.run()
    finally:
        if core_share is not None:
            shutil.rmtree(core_share, ignore_errors=True)


def stage_queues(specs: list[ModelSpec], stage: str) -> list[str]:
    """The queues a worker consumes: `model` the models' own, `prep` their separate decoding stages, `all` both."""
    prep = [spec.prep_queue_name for spec in specs if spec.prep_queue_name]
    model = [spec.queue_name for spec in specs]
    return {"model": model, "prep": prep}.get(stage, model + prep)


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
