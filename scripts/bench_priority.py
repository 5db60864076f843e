"""Priority and fairness under a backlog: printed figures, not a timed test.

1. STAT behind a backlog: the same STAT job submitted alone to an idle worker (its idle latency), then a backlog of
   routine jobs queued, then STAT jobs arriving one by one (each after the previous finished, at a random point of
   the batch in progress). Prints STAT end-to-end latencies (submitted_at to finished_at, Redis's clock) and the
   ratio p99 loaded / median idle (target <= 2).
2. Tenants: tenant A queues a flood, then tenant B queues a few. Prints how many of A's jobs finished after B's
   arrival and before B's last job (target < 100).

The worker is `inferq worker --pool cpu --models MODEL` with its defaults (one single-threaded node per usable CPU),
or with `--one-node` a single node (`celery -A inferq.workers.app worker -Q MODEL -P threads -c SLOTS`, SLOTS as
`inferq worker` sets it) whose torch uses every CPU; on a private Redis. Jobs are submitted in-process through
`JobSubmitter`, the path every intake takes.

    .venv/bin/python scripts/bench_priority.py --model chest-xray            # 1,000 routine, 20 STAT; A 1,000, B 20
    .venv/bin/python scripts/bench_priority.py --model chest-xray --quick    # 150 routine, 10 STAT; A 300, B 20
    .venv/bin/python scripts/bench_priority.py --model fraud
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferq.config import Settings
from inferq.producers.demo import fraud_example
from inferq.producers.redis_server import EmbeddedRedis
from inferq.producers.samples import write_samples
from inferq.producers.stack import ServiceStack
from inferq.producers.submit import JobSubmitter, SubmitItem, SubmitOptions
from inferq.protocol.celery_config import build_celery, default_slots
from inferq.protocol.codec import TensorPayload
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.fairness import tenant_buckets
from inferq.protocol.intake import FileUpload, TensorUpload
from inferq.protocol.priority import Priority
from inferq.protocol.registry import load_registry
from inferq.workers.layout import usable_cpus
from inferq.workers.supervisor import celery_worker_argv

_POLL_S = 0.05


class Bench:
    def __init__(self, model: str, redis_url: str, tmp: Path) -> None:
        self.model = model
        self.settings = Settings(redis_url=redis_url)
        registry = load_registry(self.settings.registry_path)
        self.stores: Stores = open_stores(redis_url, queued_ttl_s=3600, result_ttl_s=3600)
        self.registry = registry
        celery = build_celery(self.settings, registry)
        self.submitter = JobSubmitter(settings=self.settings, registry=registry, stores=self.stores, celery_app=celery)
        if model == "fraud":
            self.upload: FileUpload | TensorUpload = TensorUpload(
                inputs=[TensorPayload.model_validate(t) for t in fraud_example(rows=1)]
            )
        else:
            self.upload = FileUpload(data=write_samples(tmp / "samples")[0].read_bytes())

    def submit(self, count: int, *, tenant: str = "bench", priority: Priority = Priority.ROUTINE) -> list[str]:
        options = SubmitOptions(priority=priority, tenant=tenant)
        job_ids: list[str] = []
        for start in range(0, count, 500):
            items = [SubmitItem(self.upload, options)] * min(500, count - start)
            job_ids += [o.job_id for o in self.submitter.submit_many(self.model, items)]  # type: ignore[union-attr]
        return job_ids

    def wait(self, job_ids: list[str], timeout_s: float = 1800.0) -> None:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            pipe = self.stores.text.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(f"inferq:job:{job_id}", "finished_at")
            if all(pipe.execute()):
                return
            time.sleep(_POLL_S)
        raise TimeoutError("jobs did not finish")

    def times(self, job_id: str) -> tuple[float, float]:
        fields = self.stores.jobs.fields(job_id)
        assert fields["status"] == "succeeded", fields.get("error")
        return float(fields["submitted_at"]), float(fields["finished_at"])

    def latency_s(self, job_id: str) -> float:
        submitted, finished = self.times(job_id)
        return finished - submitted

    def one_by_one(self, count: int, priority: Priority, spread_s: float) -> list[float]:
        latencies = []
        for _ in range(count):
            time.sleep(random.uniform(0, spread_s))
            [job_id] = self.submit(1, priority=priority)
            self.wait([job_id])
            latencies.append(self.latency_s(job_id))
        return latencies

    def drain(self) -> None:
        """Drop what is still queued: the broker's lists, and the records (the worker then claims nothing)."""
        for name in self.stores.text.keys(f"{self.model}*"):
            self.stores.text.delete(name)
        while self.stores.text.zcard("inferq:leases"):
            time.sleep(_POLL_S)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stat_behind_backlog(bench: Bench, routine: int, stat: int) -> None:
    idle = bench.one_by_one(stat, Priority.STAT, 0.0)
    backlog = bench.submit(routine)
    time.sleep(1.0)  # the worker is busy with full batches
    loaded = bench.one_by_one(stat, Priority.STAT, 0.5)
    still_queued = bench.submitter.queue_depths([bench.model])[bench.model]
    print(f"STAT behind {routine} routine jobs ({still_queued} still queued at the end):")
    print(f"  idle:   median {statistics.median(idle) * 1000:7.0f} ms   p99 {_p(idle, 0.99) * 1000:7.0f} ms")
    print(f"  loaded: median {statistics.median(loaded) * 1000:7.0f} ms   p99 {_p(loaded, 0.99) * 1000:7.0f} ms")
    ratio = _p(loaded, 0.99) / statistics.median(idle)
    print(f"  ratio p99 loaded / median idle: {ratio:.2f}  (target <= 2)")
    bench.drain()
    del backlog


def tenants_take_turns(bench: Bench, flood: int, few: int) -> None:
    buckets = bench.settings.tenant_buckets
    a = "tenant-a"
    # Two tenants in different buckets: with the same hash they would share one turn (protocol.fairness).
    own = tenant_buckets(a, buckets=buckets)
    b = next(f"tenant-b{n}" for n in range(100) if tenant_buckets(f"tenant-b{n}", buckets=buckets) != own)
    a_jobs = bench.submit(flood, tenant=a)
    time.sleep(1.0)
    b_arrived_s = bench.stores.jobs.server_time_s()
    b_jobs = bench.submit(few, tenant=b)
    bench.wait(b_jobs)
    b_last_s = max(bench.times(j)[1] for j in b_jobs)
    pipe = bench.stores.text.pipeline(transaction=False)
    for job_id in a_jobs:
        pipe.hget(f"inferq:job:{job_id}", "finished_at")
    finished = [float(f) for f in pipe.execute() if f]
    between = sum(1 for f in finished if b_arrived_s <= f <= b_last_s)
    before = sum(1 for f in finished if f < b_arrived_s)
    print(f"tenant A queued {flood}, tenant B then queued {few} ({before} of A's had finished):")
    print(f"  A's jobs finished after B arrived and before B's last: {between}  (target < 100)")
    print(f"  B's last job finished {b_last_s - b_arrived_s:.1f} s after B arrived")
    bench.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="chest-xray", choices=["chest-xray", "fraud"])
    parser.add_argument("--quick", action="store_true", help="Smaller counts, for a 2-core machine.")
    parser.add_argument("--slots", type=int, default=0, help="Worker slots (INFERQ_WORKER_SLOTS); 0: the default.")
    parser.add_argument("--one-node", action="store_true", help="One worker node using every CPU, not the default.")
    args = parser.parse_args()
    routine, stat, flood, few = (150, 10, 300, 20) if args.quick else (1000, 20, 1000, 20)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with EmbeddedRedis(tmp / "redis") as redis_server:
            env = {**os.environ, "INFERQ_REDIS_URL": redis_server.url}
            if args.slots:
                env["INFERQ_WORKER_SLOTS"] = str(args.slots)
            bench = Bench(args.model, redis_server.url, tmp)
            # As `inferq worker` does: slots from this node's model, not from every model of the registry.
            slots = args.slots or default_slots([bench.registry.get_model(args.model)])
            with ServiceStack(env, tmp / "logs") as services:
                if args.one_node:
                    env["INFERQ_TORCH_THREADS"] = str(usable_cpus())
                    argv = celery_worker_argv([args.model], "bench@%h", slots=slots, loglevel="warning")
                    services.start_command("worker", argv)
                    layout = f"one worker node using {usable_cpus()} CPUs"
                else:
                    services.start("worker", "worker", "--pool", "cpu", "--models", args.model)
                    layout = f"`inferq worker` defaults: {usable_cpus()} single-threaded nodes"
                bench.wait(bench.submit(4 * usable_cpus()), timeout_s=300)  # every node warm
                print(f"model {args.model}, {layout}, slots {slots} per node, {os.cpu_count()} cores")
                stat_behind_backlog(bench, routine, stat)
                tenants_take_turns(bench, flood, few)


if __name__ == "__main__":
    main()
