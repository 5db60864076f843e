"""The Celery app a user writes first, before choosing inferq: the baseline of `scripts/bench.py`.

Redis as broker and result backend, JSON, one task per job with the image itself (base64) in the message, the
models loaded once per worker process, and Celery's defaults for everything else (prefork, one process per CPU,
prefetch 4, early acknowledgement). It runs the same preprocessing and model as inferq (`ModelRunner`), so the
benchmark compares the plumbing, not the maths. On a GPU host (`INFERQ_BENCH_DEVICE=cuda`) each process moves the
models to the device, as a user's `model.to("cuda")` in the same place would.

    INFERQ_REDIS_URL=redis://... PYTHONPATH=scripts celery -A naive_celery_app worker
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from celery import Celery
from celery.signals import worker_process_init

from inferq.config import Settings
from inferq.protocol.registry import load_registry
from inferq.workers.inference import ModelRunner, load_runner

CHEST_XRAY_MODEL, FRAUD_MODEL = "chest-xray", "fraud"
CHEST_XRAY_TASK = "naive.chest_xray"
FRAUD_TASK = "naive.fraud"
# Where the models compute: "cpu" (the default) or "cuda".
DEVICE_ENV = "INFERQ_BENCH_DEVICE"
# The models each process loads, comma-separated (default: both).
MODELS_ENV = "INFERQ_BENCH_MODELS"
_runners: dict[str, ModelRunner] = {}


@worker_process_init.connect
def _load_models(**_: Any) -> None:
    settings = Settings()
    registry = load_registry(settings.registry_path)
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    for name in os.environ.get(MODELS_ENV, f"{CHEST_XRAY_MODEL},{FRAUD_MODEL}").split(","):
        _runners[name] = load_runner(registry.get_model(name), settings, device)


def chest_xray(image_b64: str) -> dict[str, Any]:
    return _runners[CHEST_XRAY_MODEL].run(base64.b64decode(image_b64))


def fraud(rows: list[list[float]]) -> list[list[float]]:
    return _runners[FRAUD_MODEL].infer(np.asarray(rows, dtype=np.float32)).tolist()


def create_app(redis_url: str) -> Celery:
    """The app; the benchmark's client threads make one each, as separate user processes would."""
    app = Celery("naive", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    app.task(name=CHEST_XRAY_TASK)(chest_xray)
    app.task(name=FRAUD_TASK)(fraud)
    return app


app = create_app(Settings().redis_url_or_default)
