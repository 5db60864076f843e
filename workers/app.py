"""The worker's Celery app: `celery -A inferq.workers.app worker -Q chest-xray` (or `inferq worker`, which starts
one such node per usable CPU).

A node picks the models of the queues it consumes, checks their weights, loads and warms them, and starts its
batchers and lease keeper before it takes a job. Its pool is threads: one thread per job it holds, so that jobs
that are there at the same time can share a forward pass.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from os import EX_CONFIG
from typing import Any

from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import celeryd_after_setup, worker_process_init, worker_shutdown

from inferq.config import Settings
from inferq.protocol.callbacks import register_callback_task
from inferq.protocol.celery_config import build_celery, default_slots, model_queue_names
from inferq.protocol.errors import InferqError
from inferq.protocol.fairness import publish_options
from inferq.protocol.jobs import Claim
from inferq.protocol.keys import CALLBACK_QUEUE, CALLBACK_TASK, task_name_for, tenant_queues
from inferq.protocol.logs import connect_celery_logging
from inferq.protocol.priority import stored_priority
from inferq.protocol.registry import load_registry
from inferq.workers.runtime import WorkerRuntime, require_cuda
from inferq.workers.tasks import register_tasks

log = logging.getLogger(__name__)

settings = Settings()
registry = load_registry(settings.registry_path)
app = build_celery(settings, registry)
runtime = WorkerRuntime(settings, registry)
register_tasks(app, registry, lambda: runtime)


def _queues_in(argv: list[str]) -> set[str]:
    """The queues of `celery worker -Q a,b` (also `-Qa,b`, `--queues a,b`, `--queues=a,b`) on this command line."""
    names: set[str] = set()
    for i, word in enumerate(argv):
        if word in ("-Q", "--queues") and i + 1 < len(argv):
            names.update(argv[i + 1].split(","))
        elif word.startswith("--queues="):
            names.update(word.removeprefix("--queues=").split(","))
        elif word.startswith("-Q") and len(word) > 2:
            names.update(word[2:].split(","))
    return {name.strip() for name in names}


# A node started without `-c` holds one batch of the models it serves, not of the registry's largest: more slots
# than a batch let routine jobs fetched ahead delay a STAT job (protocol.celery_config). Celery reads this default
# when it parses the worker's options, after importing this module; the queues are known only from the command line.
_served = [s for s in registry.values() if {s.queue_name, s.prep_queue_name} & _queues_in(sys.argv)]
if _served:
    app.conf.worker_concurrency = default_slots(_served)
register_callback_task(app, settings)
runtime.send_callback = lambda job_id: _send_callback(job_id)
runtime.send_prepared = lambda model, job_id, tensor_ref, claim: _send_prepared(model, job_id, tensor_ref, claim)
connect_celery_logging(settings)


def _send_callback(job_id: str) -> None:
    try:
        app.send_task(CALLBACK_TASK, args=[job_id], queue=CALLBACK_QUEUE)
    except Exception as e:  # the reconciler hands the callback out once its grace has passed
        log.warning("job %s: callback not queued now (%s)", job_id, type(e).__name__, extra={"job_id": job_id})


def _send_prepared(model: str, job_id: str, tensor_ref: str, claim: Claim) -> None:
    try:
        # The model's queue: the same tenant's sub-queue and priority as the decoding stage's (protocol.fairness).
        routing = publish_options(
            settings,
            registry.get_model(model).queue_name,
            tenant=claim.tenant,
            priority=stored_priority(claim.priority),
            remaining_s=claim.expires_at_s - time.time(),
        )
        app.send_task(
            task_name_for(model), args=[job_id, tensor_ref], kwargs={"prepared": True}, task_id=job_id, **routing
        )
    except Exception as e:  # the job waits as queued; the reconciler publishes it once its message counts as lost
        log.warning("job %s: decoded, but not queued for its model now (%s)", job_id, type(e).__name__)


def _add_tenant_queues(queues: Any) -> None:
    """`-Q chest-xray` (or `chest-xray.prep`) means the stage of the model: consume its tenant sub-queues too
    (protocol.fairness), as Celery's documentation adds queues in this signal."""
    for queue in model_queue_names(registry):
        if queue in queues.consume_from:
            for name in tenant_queues(queue, settings.tenant_buckets):
                if name not in queues.consume_from:
                    queues.select_add(queues[name])


@celeryd_after_setup.connect
def _prepare(sender: str, instance: Any, **_: Any) -> None:
    _add_tenant_queues(instance.app.amqp.queues)
    queues = set(instance.app.amqp.queues.consume_from)
    # A decoding-stage queue needs no model loaded: only the models of the model queues are.
    runtime.select([spec for spec in registry.values() if spec.queue_name in queues], queues=sorted(queues))
    try:
        if settings.device == "cuda":
            require_cuda()
        runtime.prepare_weights()
        pool = instance.pool_cls
        if not (isinstance(pool, type) and issubclass(pool, PreforkPool)):
            runtime.start(node=sender, slots=instance.concurrency)
    except InferqError as e:
        # A worker that cannot serve its models must not take their jobs: stop with the reason. Celery turns a
        # SystemExit raised here into the worker's exit status, and drops its message, so say it first.
        print(f"inferq worker cannot start: {e.message}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG) from e


# The process that imported this module; prefork children are other processes.
_MAIN_PID = os.getpid()


@worker_process_init.connect
def _load_models(**_: Any) -> None:
    # Prefork children load their models here. The solo pool sends this signal too, in the main process and before
    # the queues are known: there `_prepare` starts the runtime once it knows which models to load.
    if os.getpid() != _MAIN_PID:
        runtime.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    runtime.stop()
