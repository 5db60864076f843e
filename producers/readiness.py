"""Which models have a live worker: every worker process heartbeats each queue it consumes into Redis (see
`workers.leases`), so readiness is a read of those heartbeats, not a broadcast to the workers. A model's tenant
sub-queues (protocol.fairness) are consumed together with their base queue (`inferq.workers.app`), so the base queue's
heartbeats count for them all."""

from __future__ import annotations

from inferq.config import Settings
from inferq.protocol.connections import Stores
from inferq.protocol.keys import consumers_key
from inferq.protocol.registry import Registry

# A worker heartbeats every lease_s / 4 (5 s by default); three missed beats and it counts as gone.
HEARTBEAT_STALE_S = 15.0


def served_models(settings: Settings, registry: Registry) -> list[str]:
    """The models this deployment promises to serve: the setting, else the whole registry."""
    named = [name.strip() for name in settings.served_models.split(",") if name.strip()]
    return [registry.get_model(name).name for name in named] or list(registry)


def consumers_per_model(stores: Stores, registry: Registry, models: list[str]) -> dict[str, int]:
    """Live worker processes per model, in one round trip; a model whose decoding runs as its own stage counts
    the fewer of its two stages' workers (either stage alone cannot finish a job)."""
    now_s = stores.jobs.server_time_s()
    queues = {name: _stage_queues(registry, name) for name in models}
    pipe = stores.text.pipeline(transaction=False)
    for names in queues.values():
        for queue in names:
            pipe.zcount(consumers_key(queue), now_s - HEARTBEAT_STALE_S, "+inf")
    counts = iter(pipe.execute())
    return {name: min(int(next(counts)) for _ in names) for name, names in queues.items()}


def _stage_queues(registry: Registry, model: str) -> list[str]:
    spec = registry.get_model(model)
    return [spec.queue_name] + ([spec.prep_queue_name] if spec.prep_queue_name else [])
