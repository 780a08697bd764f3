"""Reading archived days as if they were still in ``usage_events``: one home for every raw-event reader.

Whole minutes of usage come from the aggregates, which are never archived; raw events are read only
for the partial minutes at a range's edges and for ``unique_count`` and ``latest`` meters (see
``meter_platform.meters.usage``), by meter rebuilds and by the event lookup. When such a read reaches
an archived day, the rows it needs (the meter's event type, the customer, the time ranges) are read
from the day's Parquet parts into a temporary table shaped like ``usage_events`` in the same session,
and the same SQL runs over ``usage_events UNION ALL`` that table: the answer is the one the hot
partition gave, computed by the same code.

The common case costs nothing: a range that starts at or after yesterday 00:00 UTC cannot reach an
archived day (:data:`~meter_platform.archive.settings.MIN_HOT_DAYS`), and a minute-aligned range of a
count, sum, min, max or avg meter reads no raw events at all; both run the query as before.

Concurrency: archiving a day inserts its ``archived_days`` row and drops its partition in one
transaction. A reader looks at the day's parts before and after its query; if they are the same, no
archive of a day in its range committed in between, so every day not archived was read from its
partition (and an archived day from its files); otherwise it reads again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from meter_platform.archive import staging, store
from meter_platform.archive.settings import MIN_HOT_DAYS
from meter_platform.meters.aggregates import psycopg_bind
from meter_platform.meters.usage import UsageQuery, usage_sql

#: The temporary table of archived rows, and the relation the SQL reads raw events from when it has them.
TABLE = "archived_usage_events"
SOURCE = f"(SELECT * FROM usage_events UNION ALL SELECT * FROM pg_temp.{TABLE}) AS usage_events"
MINUTE = timedelta(minutes=1)
#: How often a read is tried again when days of its range were archived while it ran.
ATTEMPTS = 5

Range = tuple[datetime | None, datetime | None]  # half-open [start, end); None: unbounded


@dataclass(frozen=True, order=True)
class Part:
    """One archived part of a day that still has its file."""

    day: date
    part: int
    path: str


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + MINUTE


def hot_from(now: datetime | None = None) -> datetime:
    """Yesterday 00:00 UTC: no archived day is at or after it (at least MIN_HOT_DAYS stay hot)."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    day = today - timedelta(days=MIN_HOT_DAYS)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def raw_ranges(q: UsageQuery, now: datetime | None = None) -> list[Range]:
    """The time ranges in which the usage SQL of ``q`` reads raw events and that may reach archived
    days; empty in the common case (then the query runs as it is)."""
    if q.meter.aggregation in ("unique_count", "latest"):
        ranges: list[Range] = [(q.start, q.end)]
    elif q.start is None:  # from the first aggregated minute: a whole minute; only the end's edge
        ranges = [(_floor_minute(q.end), q.end)] if _floor_minute(q.end) != q.end else []
    else:
        inner_start = min(_ceil_minute(q.start), q.end)
        inner_end = max(_floor_minute(q.end), q.start)
        ranges = [(q.start, inner_start), (max(inner_end, inner_start), q.end)]
    recent = hot_from(now)
    return [(s, e) for s, e in ranges if (s is None or e is None or s < e) and (s is None or s < recent)]


def _day_bounds(ranges: Iterable[Range]) -> list[tuple[date | None, date | None]]:
    out = []
    for s, e in ranges:
        first = s.astimezone(UTC).date() if s is not None else None
        last = (e - timedelta(microseconds=1)).astimezone(UTC).date() if e is not None else None
        out.append((first, last))
    return out


#: The parts (with files) of archived days between two days (inclusive; NULL: unbounded).
PARTS_SQL = (
    "SELECT day, part, path FROM archived_days WHERE path IS NOT NULL AND deleted_at IS NULL AND rows > 0"
    " AND day >= coalesce(CAST({lo} AS date), '-infinity') AND day <= coalesce(CAST({hi} AS date), 'infinity')"
)


def parts_sql(ranges: list[Range], bind: Callable[[str], str]) -> tuple[str, dict[str, Any]]:
    """One query for the parts of every day the ranges touch (in ``bind``'s placeholder style)."""
    params: dict[str, Any] = {}
    selects = []
    for i, (lo, hi) in enumerate(_day_bounds(ranges)):
        params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        selects.append(PARTS_SQL.format(lo=bind(f"lo{i}"), hi=bind(f"hi{i}")))
    return " UNION ".join(selects) + " ORDER BY 1, 2", params


def find_parts(conn: psycopg.Connection, ranges: list[Range]) -> list[Part]:
    """The archived parts whose days the ranges touch."""
    if not ranges:
        return []
    sql, params = parts_sql(ranges, psycopg_bind)
    return [Part(*r) for r in conn.execute(sql, params).fetchall()]


def _filter(event_type: str | None, customer: str | None, ranges: list[Range]) -> Any:
    """The pyarrow expression of the rows a query may read (ranges widened to whole minutes: the SQL
    applies the exact bounds itself)."""
    import pyarrow.compute as pc

    expr = None
    for s, e in ranges:
        cond = pc.scalar(True)
        if s is not None:
            cond = cond & (pc.field("ts") >= pc.scalar(_floor_minute(s) - MINUTE))
        if e is not None:
            cond = cond & (pc.field("ts") < pc.scalar(_ceil_minute(e) + MINUTE))
        expr = cond if expr is None else expr | cond
    if expr is None:
        expr = pc.scalar(True)
    if event_type is not None:
        expr = expr & (pc.field("event_type") == event_type)
    if customer is not None:
        expr = expr & (pc.field("customer_id") == customer)
    return expr


def stage(
    conn: psycopg.Connection,
    parts: list[Part],
    event_type: str | None = None,
    customer: str | None = None,
    ranges: list[Range] | None = None,
) -> int:
    """Fill the temporary table :data:`TABLE` with the parts' rows that match; return how many."""
    staging.create_temp(conn, TABLE)
    expr = _filter(event_type, customer, ranges or [(None, None)])
    return staging.copy_batches(conn, TABLE, (b for p in parts for b in store.batches(p.path, filters=expr)))


def usage_rows(conn: psycopg.Connection, q: UsageQuery, now: datetime | None = None) -> list[Any]:
    """The rows of the usage query ``q`` (as ``usage_sql`` returns them), archived days included."""
    sql, params = usage_sql(q, psycopg_bind)
    ranges = raw_ranges(q, now)
    if not ranges:
        return conn.execute(sql, params).fetchall()
    parts = find_parts(conn, ranges)
    for _ in range(ATTEMPTS):
        if parts:
            stage(conn, parts, q.meter.event_type, q.customer_id, ranges)
            sql, params = usage_sql(q, psycopg_bind, events=SOURCE)
        rows = conn.execute(sql, params).fetchall()
        if parts:
            drop_staged(conn)
        after = find_parts(conn, ranges)
        if after == parts:
            return rows
        parts = after
    raise RuntimeError("days of the range kept being archived while the query ran; try again")


def usage_rows_at(database_url: str, q: UsageQuery) -> list[Any]:
    """:func:`usage_rows` on a connection of its own (for callers without a psycopg connection)."""
    from meter_platform.storage import db

    with db.connect(database_url, autocommit=True) as conn:
        return usage_rows(conn, q)


def archived_months(conn: psycopg.Connection) -> list[datetime]:
    """The UTC months (first instants) that have archived parts with files."""
    rows = conn.execute(
        "SELECT DISTINCT date_trunc('month', CAST(day AS timestamp)) AT TIME ZONE 'UTC' FROM archived_days"
        " WHERE path IS NOT NULL AND deleted_at IS NULL AND rows > 0 ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def stage_month(conn: psycopg.Connection, event_type: str, month: datetime) -> int:
    """Stage the archived rows of ``event_type`` in the UTC month starting at ``month`` (for rebuilds);
    0 when the month has no archived day. The caller holds a lock on usage_events (see rebuild)."""
    nxt = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
    parts = find_parts(conn, [(month, nxt)])
    if not parts:
        return 0
    return stage(conn, parts, event_type, None, [(month, nxt)])


def drop_staged(conn: psycopg.Connection) -> None:
    """Drop the temporary table of :func:`stage` (it also goes with the session)."""
    staging.drop_temp(conn, TABLE)


def find_event(conn: psycopg.Connection, event_id: str) -> dict[str, Any] | None:
    """The archived row of ``event_id`` (columns of usage_events; jsonb as parsed JSON), or None when
    its day is not archived (or its file was deleted by retention)."""
    row = conn.execute("SELECT ts FROM event_ids WHERE id = %s", (event_id,)).fetchone()
    if row is None:
        return None
    day = row[0].astimezone(UTC).date()
    parts = [
        Part(*r)
        for r in conn.execute(
            "SELECT day, part, path FROM archived_days WHERE day = %s AND path IS NOT NULL"
            " AND deleted_at IS NULL AND rows > 0 ORDER BY part",
            (day,),
        ).fetchall()
    ]
    return read_event(parts, event_id, row[0])


def read_event(parts: list[Part], event_id: str, ts: datetime) -> dict[str, Any] | None:
    """The row of ``event_id`` (stored at ``ts``) in the parts' files, or None."""
    import json

    import pyarrow.compute as pc

    expr = (pc.field("ts") == pc.scalar(ts)) & (pc.field("id") == event_id)
    for part in parts:
        for batch in store.batches(part.path, filters=expr):
            row = batch.slice(0, 1).to_pylist()[0]
            row["properties"] = json.loads(row["properties"])
            row["metadata"] = json.loads(row["metadata"])
            return row
    return None
