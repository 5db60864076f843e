"""What one worker process holds: its settings, stores, loaded models, batchers and leases, built once per process.

Models are chosen from the queues the process consumes and loaded before it takes a job; a GPU process is a fresh
interpreter started by the supervisor (never a fork of one that touched CUDA).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis
import torch

from inferq.config import Settings
from inferq.protocol.connections import Stores, open_stores, redis_client
from inferq.protocol.errors import ModelLoadError
from inferq.protocol.jobs import Claim
from inferq.protocol.keys import blob_key
from inferq.protocol.registry import ModelSpec, Registry
from inferq.workers.batcher import DynamicBatcher
from inferq.workers.compute import ComputeThread
from inferq.workers.core_share import CoreShare
from inferq.workers.inference import ModelRunner, load_runner
from inferq.workers.layout import usable_cpus
from inferq.workers.leases import LeaseKeeper
from inferq.workers.weights import ensure_generated_weights

log = logging.getLogger(__name__)

_CUDA_PROBE = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
_CUDA_PROBE_TIMEOUT_S = 120


def require_cuda() -> None:
    """Fail with a clear message where there is no GPU; probed in a subprocess so this process stays CUDA-free."""
    probe = subprocess.run([sys.executable, "-c", _CUDA_PROBE], timeout=_CUDA_PROBE_TIMEOUT_S, check=False)
    if probe.returncode != 0:
        raise ModelLoadError("the gpu pool needs a CUDA device, and torch finds none on this host")


def retry_backoff_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff with full jitter's gentler cousin: the doubled delay times a factor in [0.5, 1.5)."""
    base_s = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** max(0, attempt - 1))
    return float(base_s * (0.5 + random.random()))  # noqa: S311 - jitter, not security


class WorkerRuntime:
    """Per-process state of a worker; `start` runs once in the process that takes jobs."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.selected: list[ModelSpec] = list(registry.values())
        self.node = f"{socket.gethostname()}-{os.getpid()}"
        self.send_callback: Callable[[str], None] = lambda job_id: None
        # (model, job id, tensor ref, the decoding attempt's claim): hand a decoded job to its model's queue; set by
        # the Celery app.
        self.send_prepared: Callable[[str, str, str, Claim], None] = lambda model, job_id, tensor_ref, claim: None
        self._runners: dict[str, ModelRunner] = {}
        self._batchers: dict[str, DynamicBatcher] = {}
        self._stores: Stores | None = None
        self._bytes: redis.Redis | None = None
        self.leases: LeaseKeeper | None = None
        self.cores: CoreShare | None = None
        # Every torch call of the process runs on it (workers.compute); made by `start`.
        self.compute: ComputeThread | None = None
        self._queues: list[str] | None = None

    def select(self, specs: list[ModelSpec], *, queues: list[str] | None = None) -> None:
        """The models to load, and the queues this process consumes (for its heartbeats; default: the models')."""
        self.selected = specs
        self._queues = queues

    def prepare_weights(self) -> None:
        """Generate (where the repo makes them) and verify every selected model's weights."""
        compute = self._compute_thread()  # generating weights runs torch, which belongs on that thread
        for spec in self.selected:
            compute.run(ensure_generated_weights, spec, self.settings)

    def start(self, node: str | None = None, *, slots: int = 0) -> None:
        """Open the stores, load and warm every selected model, start the batchers and the lease keeper (which
        heartbeats the node's `slots`, the jobs it holds at once, for the load metric)."""
        self.node = node or self.node
        self._compute_thread()
        self.cores = self._core_share()
        for spec in self.selected:
            self._runners[spec.name] = self._load(spec)
            self._batchers[spec.name] = self._batcher(spec)
        self.leases = LeaseKeeper(
            self.stores.jobs,
            node=self.node,
            queues=self._queues if self._queues is not None else [spec.queue_name for spec in self.selected],
            lease_s=self.settings.lease_s,
            on_timeout=lambda job_id: self.send_callback(job_id),
            slots=slots,
        )
        self.leases.start()
        log.info(
            "worker process %d ready: models %s, %d torch thread(s)",
            os.getpid(),
            ", ".join(self._runners) or "none",
            self._compute_thread().threads,
        )

    def stop(self) -> None:
        for batcher in self._batchers.values():
            batcher.stop()
        if self.leases is not None:
            self.leases.stop()
        if self.compute is not None:
            self.compute.shutdown()

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            s = self.settings
            self._stores = open_stores(s.redis_url_or_default, queued_ttl_s=s.queued_ttl_s, result_ttl_s=s.result_ttl_s)
        return self._stores

    def claim(self, job_id: str, blob_ref: str) -> tuple[Claim, bytes | None]:
        """Claim the job and fetch its upload in one round trip."""
        [claimed] = self.claim_many([(job_id, blob_ref)])
        return claimed

    def claim_many(self, jobs: list[tuple[str, str]]) -> list[tuple[Claim, bytes | None]]:
        """Claim jobs and fetch their uploads in one round trip: (job id, blob ref) in, (claim, upload) out."""
        if not jobs:
            return []
        if self._bytes is None:
            self._bytes = redis_client(self.settings.redis_url_or_default, decode=False)
        store, pipe = self.stores.jobs, self._bytes.pipeline(transaction=False)
        ids = [job_id for job_id, _ in jobs]
        calls = store.claim_all(ids, node=self.node, pid=os.getpid(), lease_s=self.settings.lease_s, client=pipe)
        pipe.mget([blob_key(blob_ref) for _, blob_ref in jobs])
        replies = store.execute(pipe)
        claims = [store.claim_result(reply) for reply in store.replies_of(replies[:calls])]
        return list(zip(claims, replies[calls], strict=True))

    def runner(self, model: str) -> ModelRunner:
        if model not in self._runners:
            self._runners[model] = self._load(self.registry.get_model(model))
        return self._runners[model]

    def batcher(self, model: str) -> DynamicBatcher:
        if model not in self._batchers:
            self._batchers[model] = self._batcher(self.registry.get_model(model))
        return self._batchers[model]

    def device(self) -> torch.device:
        return torch.device("cuda" if self.settings.device == "cuda" else "cpu")

    def torch_threads(self) -> int:
        """Per process: as set, else the usable CPUs shared out among the host's worker processes."""
        processes = self.settings.worker_processes or 1
        return self.settings.torch_threads or max(1, usable_cpus() // processes)

    def _batcher(self, spec: ModelSpec) -> DynamicBatcher:
        runner = self.runner(spec.name)
        return DynamicBatcher(
            name=spec.name,
            run_batch=runner.infer,
            gate=self.stores.jobs.begin,
            max_batch_size=spec.max_batch_size,
            batch_wait_ms=spec.batch_wait_ms,
            max_batch_ms=spec.max_batch_ms,
            urgent_waiting=lambda rank: self.stores.jobs.more_urgent_waiting(spec.name, rank),
            cores=self.cores,
            compute_thread=self._compute_thread().executor,
        )

    def _core_share(self) -> CoreShare | None:
        """This node's side of its `inferq worker`'s core lending (workers.core_share), where that command made a share:
        only for CPU nodes, with lending on."""
        folder = self.settings.core_share_dir
        if not folder:
            return None
        return CoreShare(
            Path(folder),
            index=self.settings.node_index,
            threads=self.torch_threads(),
            max_threads=usable_cpus(),
            set_threads=torch.set_num_threads,
        )

    def _compute_thread(self) -> ComputeThread:
        if self.compute is None:
            self.compute = ComputeThread(self.torch_threads())
        return self.compute

    def _load(self, spec: ModelSpec) -> ModelRunner:
        return self._compute_thread().run(self._load_here, spec)

    def _load_here(self, spec: ModelSpec) -> ModelRunner:
        runner = load_runner(spec, self.settings, self.device())
        runner.warm_up()
        return runner
