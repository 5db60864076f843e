"""Job priority: the three classes a hospital uses, and how each broker is told about them.

A job is `stat` (suspected pneumothorax: read it now), `urgent` or `routine` (the default). Clients may still send
the old numeric form 0..9 (0, the old default, most routine): 0-4 is `routine`, 5-8 `urgent`, 9 `stat`; the split
at 5 is where RabbitMQ's quorum queues draw their "high" line, so the numbers mean the same on both brokers.

Where the order is decided:
- Redis (kombu): one list per priority step, polled in ascending order by one BRPOP, so a LOWER number is taken
  first. inferq uses steps 0..8: three per class (stat 0-2, urgent 3-5, routine 6-8), the step within a class
  being the job's deadline tier (`deadline_tier`), so that the broker already hands out jobs of equal priority
  with tight deadlines first. Within one step messages are first in, first out.
- RabbitMQ: a HIGHER number is taken first, and quorum queues know two levels only (0-4 normal, 5+ high,
  delivered about 2:1): stat (9) and urgent (5) are both "high", routine (0) "normal"; deadlines are not seen.
- In a worker, the batcher orders the jobs it holds exactly: class, then deadline (`expires_at`), then arrival.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from inferq.protocol.errors import InvalidRequest


class Priority(StrEnum):
    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """0 for the most urgent class: what the batcher sorts on."""
        return _RANKS[self]


_RANKS = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}
DEFAULT_PRIORITY = Priority.ROUTINE
MAX_NUMERIC_PRIORITY = 9
# A deadline at most this far away puts a job in its class's first tier, then its second; later or none: third.
DEADLINE_TIERS_S = (60.0, 900.0)
_STEPS_PER_CLASS = len(DEADLINE_TIERS_S) + 1
# The kombu Redis priority steps inferq publishes to (see protocol.keys.KOMBU_PRIORITY_STEPS).
REDIS_PRIORITY_STEPS = tuple(range(len(_RANKS) * _STEPS_PER_CLASS))
PRIORITY_HELP = "stat, urgent or routine (the default); the old numbers 0..9 also work: 0-4 routine, 5-8 urgent, 9 stat"
_AMQP_PRIORITIES = {Priority.STAT: 9, Priority.URGENT: 5, Priority.ROUTINE: 0}


def parse_priority(value: object) -> Priority:
    """A class name, or the numeric alias 0..9 (as int or text); empty means the default. Anything else:
    `InvalidRequest` quoting the value."""
    if value is None or value == "":
        return DEFAULT_PRIORITY
    if isinstance(value, Priority):
        return value
    text = str(value).strip().lower()
    if text in Priority.__members__.values():
        return Priority(text)
    if isinstance(value, bool) or not text.isdigit() or int(text) > MAX_NUMERIC_PRIORITY:
        raise InvalidRequest(f"priority must be stat, urgent, routine or 0..9, got {value!r}")
    number = int(text)
    return Priority.STAT if number == MAX_NUMERIC_PRIORITY else Priority.URGENT if number >= 5 else Priority.ROUTINE


def stored_priority(value: str | None) -> Priority:
    """A job record's priority; a record written by a version that stored other values counts as routine."""
    try:
        return parse_priority(value)
    except InvalidRequest:
        return DEFAULT_PRIORITY


def deadline_tier(remaining_s: float) -> int:
    """0 for a job due within a minute, 1 within a quarter hour, 2 for later or no deadline of its own."""
    return sum(1 for limit_s in DEADLINE_TIERS_S if remaining_s > limit_s)


def broker_priority(priority: Priority, remaining_s: float, broker: Literal["redis", "amqp"]) -> int:
    """The number Celery's `send_task(priority=...)` gets for this job on this broker."""
    if broker == "amqp":
        return _AMQP_PRIORITIES[priority]
    return priority.rank * _STEPS_PER_CLASS + deadline_tier(remaining_s)
