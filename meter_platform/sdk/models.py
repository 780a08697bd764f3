"""Typed answers of the gateway, as msgspec Structs (decoded straight from the JSON bytes).

Fields the gateway may add later are ignored; numbers that are exact decimals in the API (usage values,
money) decode to ``int`` or ``Decimal`` (never a binary float); times decode to aware ``datetime``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec


class ItemError(msgspec.Struct, frozen=True):
    """One bad item of a refused batch: its position in the batch, the field, and what is wrong."""

    index: int
    field: str
    message: str


class Accepted(msgspec.Struct, frozen=True):
    """The 202 answer of ``POST /v1/events``."""

    accepted: int
    ids: list[str]


class StoredEvent(msgspec.Struct, frozen=True):
    """``GET /v1/events/{id}``: the event as the pipeline saw it, and its state."""

    id: str
    state: Literal["stored", "quarantined", "pending"]
    event_type: str | None = None
    customer_id: str | None = None
    timestamp: datetime | None = None
    received_at: datetime | None = None
    properties: Any = None
    metadata: Any = None
    reasons: list[Any] = []
    stream_seq: int | None = None


class Meter(msgspec.Struct, frozen=True):
    """A meter of the catalog (``GET /v1/meters``)."""

    slug: str
    event_type: str
    aggregation: str
    value_property: str | None = None
    group_by: list[str] = []
    filter: dict[str, Any] = {}


class UsageRow(msgspec.Struct, frozen=True):
    """One window (and group) of a usage answer; ``value`` is exact (``int`` or ``Decimal``)."""

    window_start: datetime
    window_end: datetime
    value: int | Decimal | None
    group: dict[str, Any] = {}
    customer_id: str | None = None


class Usage(msgspec.Struct, frozen=True):
    """``GET /v1/meters/{slug}/usage``: rows over ``[start, end)``; ``next_offset`` when there are more."""

    meter: str
    data: list[UsageRow]
    window: str | None = None
    tz: str | None = None
    start: datetime | None = msgspec.field(default=None, name="from")
    end: datetime | None = msgspec.field(default=None, name="to")
    next_offset: int | None = None

    @property
    def total(self) -> int | Decimal:
        """The sum of the rows' values (meaningful for count and sum meters)."""
        return sum((row.value for row in self.data if row.value is not None), 0)


class InvoiceLine(msgspec.Struct, frozen=True):
    """A line of an invoice; amounts are exact decimals."""

    type: str
    description: str
    amount: Decimal
    plan: str | None = None
    meter: str | None = None
    group: dict[str, Any] | None = None
    quantity: Decimal | None = None
    precise_amount: Decimal | None = None
    service_period_start: datetime | None = None
    service_period_end: datetime | None = None
    tiers: list[dict[str, Any]] | None = None
    adjusts_period: str | None = None
    events: int | None = None


class Invoice(msgspec.Struct, frozen=True):
    """An invoice (``GET /v1/invoices``): ``draft`` or ``final``, with its lines and totals."""

    id: str
    customer_id: str
    period: str
    status: str
    currency: str
    total: Decimal
    lines: list[InvoiceLine] = []
    number: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    subtotal: Decimal | None = None


class StreamStatus(msgspec.Struct, frozen=True):
    """The JetStream stream; ``None`` values are unknown (see ``IngestStatus.degraded``)."""

    name: str
    last_seq: int | None = None
    messages: int | None = None


class ConsumerStatus(msgspec.Struct, frozen=True):
    """The pipeline's consumer; ``uncounted`` is the true backlog."""

    name: str
    pending: int | None = None
    ack_pending: int | None = None
    ack_floor: int | None = None
    uncounted: int | None = None


class EventTotals(msgspec.Struct, frozen=True):
    """The ledger: ``processed = stored + duplicates + quarantined``."""

    processed: int | None = None
    stored: int | None = None
    duplicates: int | None = None
    quarantined: int | None = None
    balanced: bool | None = None
    replayed_from_quarantine: int | None = None
    duplicates_from_quarantine: int | None = None


class IngestStatus(msgspec.Struct, frozen=True):
    """``GET /v1/ingest/status``; ``degraded`` names the parts that did not answer in time."""

    stream: StreamStatus
    consumer: ConsumerStatus
    events: EventTotals
    degraded: list[str] = []
    quarantine_replays: dict[str, Any] = {}
    ledger: dict[str, Any] = {}
