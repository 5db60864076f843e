"""Every torch call of a worker process runs on its one compute thread (workers.compute), at the node's thread
count, while the main thread stays at one torch thread: two OpenMP teams in one process slow each other down (the
module says by how much). Checked in a fresh process, since the runtime sets the calling thread's torch threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, threading
import numpy as np, torch
from inferq.config import Settings
from inferq.protocol.jobs import new_job_id
from inferq.protocol.registry import load_registry
from inferq.workers import inference
from inferq.workers.runtime import WorkerRuntime

seen = []
original = inference.ModelRunner.infer

def watched(self, batch):
    seen.append([self.spec.name, threading.get_ident(), torch.get_num_threads()])
    return original(self, batch)

inference.ModelRunner.infer = watched
settings = Settings()
runtime = WorkerRuntime(settings, load_registry(settings.registry_path))
runtime.start(node="probe")
jobs = runtime.stores.jobs
for spec in runtime.selected:
    job_id = new_job_id()
    jobs.create(job_id, {"model": spec.name, "model_version": "1", "blob_ref": "b", "max_attempts": "3"})
    token = jobs.claim_result(jobs.claim(job_id, node="probe", pid=1, lease_s=60)).token
    rows = np.zeros((1, *inference.example_shape(spec)[1:]), dtype=np.float32)
    runtime.batcher(spec.name).submit(job_id, token, rows).result(timeout=120)
runtime.stop()
print(json.dumps({"main": [threading.get_ident(), torch.get_num_threads()], "seen": seen}))
"""


def test_every_pass_of_every_model_runs_on_one_thread_at_the_nodes_thread_count(redis_url: str) -> None:
    env = {
        **os.environ,
        "INFERQ_REDIS_URL": redis_url,
        "INFERQ_WORKER_PROCESSES": "1",
        "INFERQ_TORCH_THREADS": "2",
        "PYTHONPATH": str(_REPO),
    }
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    main_ident, main_threads = report["main"]
    seen = report["seen"]
    models = {name for name, _, _ in seen}
    assert models == {"chest-xray", "fraud"}
    # Two calls per model: its warm-up when loaded, then the pass of the job.
    assert len(seen) == 2 * len(models)
    assert len({ident for _, ident, _ in seen}) == 1
    assert seen[0][1] != main_ident
    assert {threads for _, _, threads in seen} == {2}
    assert main_threads == 1
