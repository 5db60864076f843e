"""The default worker layout follows the CPUs this process may use: affinity and cgroup quota, not the host's count."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferq.config import Settings
from inferq.producers.stack import ServiceStack
from inferq.protocol.registry import load_registry
from inferq.workers.layout import cgroup_cpu_quota, usable_cpus
from tests.conftest import REPO_ROOT


def test_a_cgroup_v2_quota_caps_the_usable_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to restrict the affinity to one")
def test_inferq_worker_starts_one_process_per_cpu_of_its_affinity() -> None:
    # Given a process allowed on one CPU only, `inferq worker` plans one worker process (it prints its layout).
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from workers.layout import default_processes; print(default_processes(threads_per_process=1))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    full = subprocess.run(
        [
            sys.executable,
            "-c",
            "from workers.layout import default_processes; print(default_processes(threads_per_process=1))",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(full.stdout) == usable_cpus() >= 2


def test_a_plain_celery_worker_without_c_holds_one_batch_of_the_models_it_serves(
    redis_url: str, tmp_path: Path
) -> None:
    # Given a registry whose largest batch is fraud's (capped at 64 slots) and a model that batches 4
    registry = Settings().registry_path.read_text()
    fraud = load_registry(Settings().registry_path).get_model("fraud")
    sized = registry + _SMALL_MODEL.format(sha=fraud.sha256, weights=fraud.weights)
    (tmp_path / "models.toml").write_text(sized)
    env = {**os.environ, "INFERQ_REDIS_URL": redis_url, "INFERQ_REGISTRY_PATH": str(tmp_path / "models.toml")}
    env |= {"INFERQ_MODELS_DIR": str(Settings().models_dir), "INFERQ_WORKER_METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "celery", "-A", "inferq.workers.app", "worker", "-Q", "fraud-small"]
    argv += ["-n", "sized@%h", "--without-mingle", "--without-gossip", "-l", "info"]
    # When it is started the way Celery users start workers, without -c
    with ServiceStack(env, tmp_path) as services:
        services.start_command("worker", argv)
        deadline = time.monotonic() + 120
        while "ready." not in services.log_of("worker") and time.monotonic() < deadline and not services.dead():
            time.sleep(0.5)
        banner = services.log_of("worker")
    # Then it holds one batch of its own model, not 64 jobs
    assert re.search(r"concurrency:\s+4 \(thread\)", banner), banner[-3000:]


_SMALL_MODEL = """
[models.fraud-small]
version = "0.1.0"
pool = "cpu"
format = "safetensors"
weights = "{weights}"
sha256 = "{sha}"
trained = false
weights_seed = 30
labels = ["fraud"]
output_name = "fraud_probability"
max_batch_size = 4
architecture = {{ name = "mlp", hidden = [64, 32] }}
input = {{ kind = "tensor", name = "transactions", shape = [-1, 30], datatype = "FP32" }}
"""
