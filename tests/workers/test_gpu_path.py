"""The GPU path: batches through pinned memory, the registry's precision and memory format, one process per device.

Marked `gpu`: these run where a CUDA device exists and skip elsewhere (the workplace's CI machines have none).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from inferq.config import DEFAULT_REGISTRY_PATH, Settings
from inferq.producers.samples import write_samples
from inferq.protocol.registry import load_registry
from inferq.workers.inference import load_runner
from inferq.workers.weights import ensure_generated_weights
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REGISTRY = load_registry(DEFAULT_REGISTRY_PATH)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_a_gpu_batch_in_each_precision_matches_the_cpu(precision: str, tolerance: float, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings()
    spec = REGISTRY.get_model("chest-xray").model_copy(update={"precision": precision, "channels_last": True})
    ensure_generated_weights(spec, settings)
    cpu = load_runner(spec, settings, torch.device("cpu"))
    gpu = load_runner(spec, settings, torch.device("cuda"))
    batch = np.stack([cpu.prepare(p.read_bytes())[0] for p in write_samples(tmp_path)])
    np.testing.assert_allclose(gpu.infer(batch), cpu.infer(batch), atol=tolerance)


def test_the_gpu_pool_starts_one_process_per_device_and_none_touches_cuda_before() -> None:
    devices = ",".join(str(i) for i in range(torch.cuda.device_count()))
    argv = [
        sys.executable,
        "-m",
        "inferq.producers.cli",
        "worker",
        "--pool",
        "gpu",
        "--models",
        "chest-xray",
        "--gpus",
        devices,
    ]
    worker = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        banner = worker.stdout.readline() if worker.stdout else ""
        assert f"{torch.cuda.device_count()} node(s)" in banner, banner
        time.sleep(5)
        assert worker.poll() is None
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
