"""Priority classes, their numeric alias, the broker numbers they become, and tenant buckets."""

from __future__ import annotations

from collections import Counter

import pytest

from inferq.config import Settings
from inferq.protocol.errors import InvalidRequest
from inferq.protocol.fairness import publish_options, queue_for_tenant, tenant_buckets
from inferq.protocol.keys import KOMBU_PRIORITY_STEPS, queue_lists
from inferq.protocol.priority import REDIS_PRIORITY_STEPS, Priority, broker_priority, parse_priority, stored_priority


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, "routine"), ("", "routine"), ("STAT", "stat"), (" urgent ", "urgent"), ("routine", "routine"),
     (0, "routine"), ("4", "routine"), (5, "urgent"), ("8", "urgent"), (9, "stat")],
)  # fmt: skip
def test_names_and_the_old_numbers_map_to_three_classes(given: object, expected: str) -> None:
    assert parse_priority(given) == Priority(expected)


@pytest.mark.parametrize("bad", ["high", "10", "-1", "1.5", 99, True])
def test_anything_else_is_refused_quoting_the_value(bad: object) -> None:
    with pytest.raises(InvalidRequest, match=r"stat, urgent, routine or 0\.\.9"):
        parse_priority(bad)


def test_a_record_with_an_unknown_priority_counts_as_routine() -> None:
    assert stored_priority("whatever") is Priority.ROUTINE and stored_priority("9") is Priority.STAT


def test_on_redis_lower_is_first_class_before_deadline_and_steps_match_the_lists() -> None:
    assert REDIS_PRIORITY_STEPS == KOMBU_PRIORITY_STEPS
    order = [
        broker_priority(Priority(name), remaining_s, "redis")
        for name in ("stat", "urgent", "routine")
        for remaining_s in (30.0, 600.0, 86400.0)
    ]
    assert order == sorted(order) == list(KOMBU_PRIORITY_STEPS)
    # A STAT job with no deadline still goes before an urgent one due in seconds.
    assert broker_priority(Priority.STAT, 86400.0, "redis") < broker_priority(Priority.URGENT, 1.0, "redis")


def test_on_rabbitmq_higher_is_first_and_quorum_queues_see_high_or_normal() -> None:
    numbers = {p: broker_priority(p, 10.0, "amqp") for p in Priority}
    assert numbers[Priority.STAT] > numbers[Priority.URGENT] >= 5 > numbers[Priority.ROUTINE]


def test_a_tenant_owns_as_many_buckets_as_its_weight() -> None:
    assert len(set(tenant_buckets("north", buckets=8))) == 1
    assert len(set(tenant_buckets("north", buckets=8, weight=3))) == 3
    assert sorted(tenant_buckets("north", buckets=4, weight=10)) == [0, 1, 2, 3]
    # The same tenant always lands in the same bucket, in every process.
    assert tenant_buckets("north", buckets=8) == tenant_buckets("north", buckets=8)


def test_a_weighted_tenant_spreads_its_jobs_over_its_buckets() -> None:
    used = Counter(queue_for_tenant("fraud", "north", buckets=8, weights={"north": 2}) for _ in range(200))
    assert len(used) == 2 and min(used.values()) > 40


def test_publish_options_name_a_declared_sub_queue_and_a_priority() -> None:
    settings = Settings(tenant_buckets=4)
    options = publish_options(settings, "fraud", tenant="north", priority=Priority.STAT, remaining_s=10.0)
    assert options["priority"] == 0
    assert options["queue"] in {name for name in queue_lists("fraud", buckets=4) if "\x06" not in name}
