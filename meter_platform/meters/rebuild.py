"""Replays: make a meter's catalog definition active by rebuilding its aggregates from raw events.

In one transaction a replay locks the meter's definition row, measures the old values, deletes the
meter's aggregates (minutes and their hourly and daily rollups), recomputes them from the stored raw events month by month, records the new
definition and reports old against new per customer. An ingestion batch either commits before the
replay takes its lock (and the replay recomputes that batch's events) or waits for it (and then
aggregates with the new definition): no event is counted under two definitions, twice, or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from meter_platform.archive import reader
from meter_platform.catalog import Catalog, Meter
from meter_platform.meters.aggregates import (
    MeterChange,
    aggregate_upsert_sql,
    definition,
    definition_hash,
    meter_from_definition,
    pending_changes,
)
from meter_platform.meters.rollups import delete_meter
from meter_platform.meters.usage import AGGREGATE_VALUES, UsageQuery


@dataclass
class ReplayReport:
    """Old against new totals per customer, for one replayed meter."""

    slug: str
    kind: str
    events: int = 0
    # customer -> (old value, new value); values are the meter's total over all time
    customers: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def changed_customers(self) -> dict[str, tuple[Any, Any]]:
        """Only the customers whose total changed."""
        return {c: v for c, v in self.customers.items() if v[0] != v[1]}


def _totals(conn: psycopg.Connection, meter: Meter | None) -> dict[str, Any]:
    """The meter's all-time value per customer: from its minutes (the level its rollups are sums of, so
    a damaged rollup does not hide a damaged minute), else as the usage API computes it."""
    if meter is None:
        return {}
    if meter.aggregation in AGGREGATE_VALUES:
        rows = conn.execute(
            f"SELECT customer_id, {AGGREGATE_VALUES[meter.aggregation]} FROM usage_minute_aggregates"
            " WHERE meter_slug = %s AND minute < date_trunc('minute', now() + interval '1 day')"
            " GROUP BY customer_id",
            (meter.slug,),
        ).fetchall()
        return dict(rows)
    totals: dict[str, Any] = {}
    offset = 0
    while True:
        query = UsageQuery(
            meter, None, datetime.now(UTC) + timedelta(days=1), group_by=("customer_id",), offset=offset
        )
        rows = reader.usage_rows(conn, query)
        for row in rows[: query.limit]:
            totals[row[2]] = row[3]
        if len(rows) <= query.limit:
            return totals
        offset += query.limit


def replay_meter(
    conn: psycopg.Connection,
    change: MeterChange,
    progress: Callable[[str], None] | None = None,
) -> ReplayReport:
    """Make the catalog's definition of one meter active, rebuilding its aggregates from raw events.

    One transaction: lock, compare, delete, recompute month by month (reported to ``progress``),
    record. The caller's connection must not be inside a transaction.
    """
    report = ReplayReport(change.slug, change.kind)
    with conn.transaction():
        # Serialize replays of the same meter and hold off ingestion's aggregate step for it.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('meter:' || %s))", (change.slug,))
        row = conn.execute(
            "SELECT definition FROM meter_definitions WHERE slug = %s FOR UPDATE", (change.slug,)
        ).fetchone()
        current = meter_from_definition(row[0]) if row else None
        old_totals = _totals(conn, current)
        # All three levels: the recomputation below rebuilds minutes, hours and days together.
        delete_meter(conn, change.slug)
        new = change.new
        if new is None:
            conn.execute("DELETE FROM meter_definitions WHERE slug = %s", (change.slug,))
        else:
            _recompute(conn, change.slug, new, progress)
            report.events = _count_events(conn, change.slug)
            _activate(conn, change.slug, new)
        new_totals = _totals(conn, new)
        for customer in sorted(old_totals.keys() | new_totals.keys()):
            report.customers[customer] = (old_totals.get(customer), new_totals.get(customer))
        _record_replay(conn, change, current, report)
    return report


def _recompute(
    conn: psycopg.Connection, slug: str, meter: Meter, progress: Callable[[str], None] | None
) -> None:
    """Aggregate the stored raw events of the meter's event type, month by month: a month with
    archived days reads their files' rows too (``meter_platform.archive.reader``).

    The lock on ``usage_events`` (held to the replay's commit) keeps days from being archived while
    the months are read: a day is read from its partition or from its files, never from neither.
    """
    conn.execute("LOCK TABLE usage_events IN ACCESS SHARE MODE")
    hot = conn.execute(
        "SELECT DISTINCT date_trunc('month', ts, 'UTC') FROM usage_events WHERE event_type = %s",
        (meter.event_type,),
    ).fetchall()
    months = sorted({r[0] for r in hot} | set(reader.archived_months(conn)))
    for i, month in enumerate(months, 1):
        staged = reader.stage_month(conn, meter.event_type, month)
        sql, params = aggregate_upsert_sql(
            meter,
            reader.SOURCE if staged else "usage_events",
            "AND ts >= %(m_start)s AND ts < %(m_start)s + interval '1 month'",
        )
        params["m_start"] = month
        conn.execute(sql, params)
        if staged:
            reader.drop_staged(conn)
        if progress:
            progress(f"{slug}: month {i}/{len(months)} ({month:%Y-%m}) recomputed")


def _activate(conn: psycopg.Connection, slug: str, meter: Meter) -> None:
    """Record ``meter`` as the active definition of ``slug`` (its next version)."""
    conn.execute(
        "INSERT INTO meter_definitions (slug, definition, definition_hash, version) VALUES (%s, %s, %s, 1)"
        " ON CONFLICT (slug) DO UPDATE SET definition = EXCLUDED.definition,"
        " definition_hash = EXCLUDED.definition_hash, version = meter_definitions.version + 1,"
        " activated_at = now()",
        (slug, json.dumps(definition(meter)), definition_hash(meter)),
    )


def _record_replay(
    conn: psycopg.Connection, change: MeterChange, current: Meter | None, report: ReplayReport
) -> None:
    """The ``meter_replays`` row: old and new definitions, events re-aggregated, old against new."""
    new = change.new
    conn.execute(
        "INSERT INTO meter_replays (slug, kind, old_definition, new_definition, events, report)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            change.slug,
            change.kind,
            json.dumps(definition(current)) if current else None,
            json.dumps(definition(new)) if new else None,
            report.events,
            json.dumps({c: [_num(o), _num(n)] for c, (o, n) in report.customers.items()}),
        ),
    )


def _count_events(conn: psycopg.Connection, slug: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(event_count), 0) FROM usage_minute_aggregates WHERE meter_slug = %s", (slug,)
    ).fetchone()
    return int(row[0]) if row else 0


def _num(value: Any) -> str | None:
    return None if value is None else str(value)


def sync_meters(
    conn: psycopg.Connection, catalog: Catalog, progress: Callable[[str], None] | None = None
) -> list[ReplayReport]:
    """Replay every pending change (see :func:`pending_changes`); return their reports."""
    return [replay_meter(conn, change, progress) for change in pending_changes(catalog, conn)]


def format_report(report: ReplayReport, limit: int = 20) -> str:
    """A few readable lines: what changed, and old against new per customer."""
    changed = report.changed_customers
    lines = [
        f"meter {report.slug} {report.kind}: {report.events} events re-aggregated; "
        f"{len(changed)} of {len(report.customers)} customers changed"
    ]
    for customer, (old, new) in list(changed.items())[:limit]:
        lines.append(f"  {customer}: {_num(old) or '-'} -> {_num(new) or '-'}")
    if len(changed) > limit:
        lines.append(f"  ... and {len(changed) - limit} more")
    return "\n".join(lines)
