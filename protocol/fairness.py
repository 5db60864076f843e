"""Fairness between tenants, built on kombu's own queue rotation rather than a scheduler of ours.

Each model queue has `tenant_buckets` sub-queues (`protocol.keys.tenant_queue`). A job goes to one of its tenant's
buckets, chosen by a hash of the tenant name; a tenant of weight w owns w buckets (its jobs spread over them at
random). A worker consumes every bucket of its models, and kombu's Redis transport reads them with one BRPOP over
the lists in its `round_robin` order, moving the bucket it was served from to the back: among buckets with work at
the same priority step, each gets one message in turn. A tenant flooding a model therefore fills its own buckets
only, and another tenant's jobs are taken every other message, whatever the flood's length.

Two tenants whose hashes meet share a bucket and split its turn: more buckets make that rarer, at the cost of more
lists per BRPOP (buckets x 9 priority steps).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from inferq.config import Settings
from inferq.protocol.celery_config import broker_kind
from inferq.protocol.keys import tenant_queue
from inferq.protocol.priority import Priority, broker_priority


def tenant_buckets(tenant: str, *, buckets: int, weight: int = 1) -> list[int]:
    """The buckets a tenant owns: `weight` consecutive ones from its hash (all of them at most)."""
    first = int.from_bytes(hashlib.sha256(tenant.encode("utf-8")).digest()[:8], "big") % buckets
    return [(first + offset) % buckets for offset in range(max(1, min(weight, buckets)))]


def queue_for_tenant(queue: str, tenant: str, *, buckets: int, weights: dict[str, int]) -> str:
    """The sub-queue of `queue` that a job of `tenant` is published to."""
    owned = tenant_buckets(tenant, buckets=buckets, weight=weights.get(tenant, 1))
    return tenant_queue(queue, owned[0] if len(owned) == 1 else random.choice(owned))  # noqa: S311 - spreading


def publish_options(
    settings: Settings, queue: str, *, tenant: str, priority: Priority, remaining_s: float
) -> dict[str, Any]:
    """`send_task` keywords for one job: its tenant's sub-queue and its broker priority (protocol.priority)."""
    return {
        "queue": queue_for_tenant(queue, tenant, buckets=settings.tenant_buckets, weights=settings.tenant_weights),
        "priority": broker_priority(priority, remaining_s, broker_kind(settings.broker_url_or_default)),
    }
