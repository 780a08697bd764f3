"""The stream's partitions: which subject a gateway message goes to and which consumer drains it.

With ``METER_PARTITIONS=1`` (the default) nothing is partitioned: the gateway publishes on
``meter.gateway.batch`` and one unfiltered durable consumer, ``meter-ingest``, takes everything.

With ``N > 1`` the gateway splits a request's events by customer, ``p = crc32(customer_id) % N``, and
publishes each part on ``meter.gateway.p<p>``; consumer ``meter-ingest-p<p>`` takes the subjects
``meter.gateway.p<k>`` for every ``k < MAX_PARTITIONS`` with ``k % N == p``, so the messages a gateway
with another N left in the stream (``p<k>`` for any k) always belong to exactly one consumer of the
current layout. Consumer ``p0`` also takes what is not partitioned: direct publishes on
``meter.events.<event_type>`` (the public contract), ``meter.gateway.batch`` (left by N=1) and the
webhook deliveries the gateway could not map.

Why by customer: a customer's events then reach one drainer only, so two drainers seldom upsert the
same aggregate rows (the ledger and the writer stay exact when they do: a direct publish may carry any
customer to p0). Why a fixed hash (crc32 of the UTF-8 id) and not Python's ``hash()``: every process,
today and after a restart, must send a customer to the same partition (``hash()`` of a str is
salted per process).

Pure functions, no NATS: the layout is checked here (disjoint filters, every subject covered), the
JetStream side (:mod:`meter_platform.capture.jetstream`) applies it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from meter_platform.config import (
    CONSUMER_NAME,
    EVENTS_SUBJECT_PREFIX,
    GATEWAY_SUBJECT,
    MAX_PARTITIONS,
    PARTITION_SUBJECT_PREFIX,
    WEBHOOK_SUBJECT,
)

T = TypeVar("T")

#: Subjects no partition owns; consumer p0 takes them (with N=1 the one consumer takes everything).
UNPARTITIONED_SUBJECTS = (f"{EVENTS_SUBJECT_PREFIX}.>", GATEWAY_SUBJECT, WEBHOOK_SUBJECT)


def partition_of(customer_id: str, partitions: int) -> int:
    """The partition of a customer: crc32 of its UTF-8 bytes modulo ``partitions`` (stable everywhere)."""
    if partitions <= 1:
        return 0
    return zlib.crc32(customer_id.encode("utf-8", "surrogatepass")) % partitions


def gateway_subject(partition: int, partitions: int) -> str:
    """Where the gateway publishes a message of ``partition``: ``meter.gateway.batch`` when unpartitioned."""
    if partitions <= 1:
        return GATEWAY_SUBJECT
    return f"{PARTITION_SUBJECT_PREFIX}{partition}"


def consumer_name(partition: int, partitions: int) -> str:
    """The durable consumer that drains ``partition``: ``meter-ingest`` when unpartitioned."""
    if partitions <= 1:
        return CONSUMER_NAME
    return f"{CONSUMER_NAME}-p{partition}"


def filter_subjects(partition: int, partitions: int) -> list[str]:
    """The subjects consumer ``partition`` takes (empty: unfiltered, everything)."""
    if partitions <= 1:
        return []
    owned = [f"{PARTITION_SUBJECT_PREFIX}{k}" for k in range(MAX_PARTITIONS) if k % partitions == partition]
    return [*UNPARTITIONED_SUBJECTS, *owned] if partition == 0 else owned


def layout(partitions: int) -> dict[str, list[str]]:
    """Every consumer of the layout for ``partitions`` with its filter subjects, in partition order.

    Raises ValueError when the filters overlap (a work-queue stream refuses that) or leave a gateway
    subject uncovered: both would be a bug here, caught by the tests for every N.
    """
    check_partitions(partitions)
    wanted = {consumer_name(p, partitions): filter_subjects(p, partitions) for p in range(partitions)}
    if partitions > 1:
        seen: dict[str, str] = {}
        for name, subjects in wanted.items():
            for subject in subjects:
                if subject in seen:
                    raise ValueError(f"{subject} is taken by both {seen[subject]} and {name}")
                seen[subject] = name
        expected = {
            *UNPARTITIONED_SUBJECTS,
            *(f"{PARTITION_SUBJECT_PREFIX}{k}" for k in range(MAX_PARTITIONS)),
        }
        if set(seen) != expected:
            raise ValueError(f"the layout for {partitions} partitions covers {sorted(seen)}")
    return wanted


def is_ours(consumer: str) -> bool:
    """A consumer of some layout of this platform (``meter-ingest`` or ``meter-ingest-p<k>``)."""
    if consumer == CONSUMER_NAME:
        return True
    prefix = f"{CONSUMER_NAME}-p"
    return consumer.startswith(prefix) and consumer[len(prefix) :].isdigit()


def check_partitions(partitions: int) -> None:
    """1 to :data:`MAX_PARTITIONS`, else ValueError."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")


def split(items: Sequence[T], customer_of: Callable[[T], str], partitions: int) -> list[tuple[int, list[T]]]:
    """``items`` grouped by partition (order kept within each), as ``(partition, items)`` in partition
    order; one group when unpartitioned (no hashing at all)."""
    if partitions <= 1:
        return [(0, list(items))] if items else []
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(partition_of(customer_of(item), partitions), []).append(item)
    return sorted(groups.items())
