"""What one worker process holds: its settings, stores and loaded models, built once per process.

Models are chosen in the parent (from the queues it consumes) and loaded in each child after the fork, so no
CUDA context is ever created before a fork.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from config import Settings
from protocol.connections import Stores, open_stores
from protocol.errors import ModelLoadError
from protocol.registry import ModelSpec, Registry
from workers.inference import ModelRunner, load_runner
from workers.weights import ensure_generated_weights

log = logging.getLogger(__name__)

_CUDA_PROBE = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
_CUDA_PROBE_TIMEOUT_S = 120


def require_cuda() -> None:
    """Fail with a clear message where there is no GPU; probed in a subprocess so this process stays CUDA-free."""
    probe = subprocess.run([sys.executable, "-c", _CUDA_PROBE], timeout=_CUDA_PROBE_TIMEOUT_S, check=False)
    if probe.returncode != 0:
        raise ModelLoadError("the gpu pool needs a CUDA device, and torch finds none on this host")


class WorkerRuntime:
    """Per-process state of a worker; `start` runs once in each process that takes jobs."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.selected: list[ModelSpec] = list(registry.values())
        self._runners: dict[str, ModelRunner] = {}
        self._stores: Stores | None = None

    def select(self, specs: list[ModelSpec]) -> None:
        self.selected = specs

    def prepare_weights(self) -> None:
        """Generate (where the repo makes them) and verify every selected model's weights, before any fork."""
        for spec in self.selected:
            ensure_generated_weights(spec, self.settings)

    def start(self) -> None:
        """Open the stores and load and warm every selected model, before this process takes a job."""
        self._configure_threads()
        self._stores = self._open_stores()
        for spec in self.selected:
            self._runners[spec.name] = self._load(spec)
        log.info("worker process %d ready with models %s", os.getpid(), ", ".join(self._runners) or "none")

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            self._stores = self._open_stores()
        return self._stores

    def runner(self, model: str) -> ModelRunner:
        """The loaded model; loads it here if this process was not started through a pool (solo, threads)."""
        if model not in self._runners:
            self._runners[model] = self._load(self.registry.get_model(model))
        return self._runners[model]

    def device(self) -> torch.device:
        return torch.device("cuda" if self.settings.device == "cuda" else "cpu")

    def _load(self, spec: ModelSpec) -> ModelRunner:
        runner = load_runner(spec, self.settings, self.device())
        runner.warm_up()
        return runner

    def _open_stores(self) -> Stores:
        s = self.settings
        return open_stores(s.redis_url_or_default, queued_ttl_s=s.queued_ttl_s, result_ttl_s=s.result_ttl_s)

    def _configure_threads(self) -> None:
        threads = self.settings.torch_threads or max(1, (os.cpu_count() or 1) // self.settings.worker_concurrency)
        torch.set_num_threads(threads)
