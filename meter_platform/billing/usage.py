"""A charge's quantity: the meter's exact value for one customer over a service period, by group.

The same SQL as the usage API (:func:`meter_platform.meters.usage.usage_sql`): whole minutes from the
aggregates, partial minutes at the edges from raw events, half-open ``[start, end)``. For a
``percentage`` charge the number of events the meter counted in the period comes with it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from meter_platform.archive import reader
from meter_platform.catalog import Meter
from meter_platform.catalog.plans import Charge
from meter_platform.meters.usage import MAX_ROWS, UsageQuery

UsageRows = list[tuple[dict[str, Any] | None, Decimal, int]]


def _values(
    conn: psycopg.Connection,
    meter: Meter,
    customer: str,
    start: datetime,
    end: datetime,
    group_by: tuple[str, ...],
) -> dict[tuple, Decimal]:
    q = UsageQuery(meter=meter, start=start, end=end, group_by=group_by, customer_id=customer, limit=MAX_ROWS)
    rows = reader.usage_rows(conn, q)  # archived days included
    if len(rows) > MAX_ROWS:
        raise RuntimeError(
            f"{meter.slug}: more than {MAX_ROWS} groups for {customer}; group by fewer dimensions"
        )
    out: dict[tuple, Decimal] = {}
    for row in rows:
        dims = tuple(row[3 : 3 + len(group_by)])
        value = row[3 + len(group_by)]
        out[dims] = Decimal(0) if value is None else Decimal(value)
    return out


def charge_usage(
    conn: psycopg.Connection, meter: Meter, charge: Charge, customer: str, start: datetime, end: datetime
) -> UsageRows:
    """(group or None, quantity, events counted) per group of ``charge`` for ``customer`` in [start, end)."""
    values = _values(conn, meter, customer, start, end, charge.group_by)
    events: dict[tuple, Decimal] = {}
    if charge.model == "percentage":
        counting = dataclasses.replace(meter, aggregation="count")  # the meter's own event_count
        events = _values(conn, counting, customer, start, end, charge.group_by)
    out: UsageRows = []
    for dims in sorted(set(values) | set(events), key=lambda d: tuple((v is not None, str(v)) for v in d)):
        group = dict(zip(charge.group_by, dims, strict=True)) if charge.group_by else None
        out.append((group, values.get(dims, Decimal(0)), int(events.get(dims, 0))))
    return out
