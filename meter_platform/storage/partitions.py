"""The day partitions of ``usage_events``: names, creation on demand, and which exist.

Raw events are partitioned by UTC day (migration 0010): ``usage_events_YYYYMMDD`` holds the events
whose ``ts`` is in [that day 00:00 UTC, the next day 00:00 UTC). There is no DEFAULT partition (a
day's partition can then be archived and dropped whole), so a row whose day has no partition cannot
be inserted: writers call :func:`ensure_day_partitions` for the days of a batch *before* the batch
transaction. Creating a partition takes a strong lock on the parent table, which waits for every
transaction using ``usage_events`` and makes new ones wait behind it; so each day is created in its
own short transaction, never inside a batch transaction that holds other locks, and with a
``lock_timeout`` so that a long query cannot make everyone wait forever (it is tried again).

Events are at most ``METER_MAX_LATENESS_DAYS`` old and 5 minutes ahead when they are stored, so a
writer only ever needs the last few weeks of days; each process remembers which partitions it has
seen (one catalog query when a day is not known yet), so the hot path costs a set lookup.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

from meter_platform.capture.envelope import parse_timestamp

log = logging.getLogger(__name__)

PARENT = "usage_events"
_NAME = re.compile(r"^usage_events_(\d{8})$")
# Serializes creators of partitions (any constant works; the same in every process).
_PARTITION_LOCK = 0x7061727464  # "partd"
#: How long one attempt at creating a partition waits for the parent's lock (then it is retried).
LOCK_TIMEOUT = "5s"
ATTEMPTS = 6

# Per database (host, port, dbname): the days whose partitions this process has seen exist.
_known: dict[tuple[str, int, str], set[date]] = {}


class MissingDayPartitions(Exception):
    """Rows for days without a partition were about to be written inside a transaction. The caller
    rolls back, calls :func:`ensure_day_partitions` (outside any transaction) and tries again."""

    def __init__(self, days: set[date]):
        super().__init__("no partition of usage_events yet for " + ", ".join(map(str, sorted(days))))
        self.days = days


def day_partition_name(day: date) -> str:
    """``usage_events_YYYYMMDD``: the partition of the events whose ts is on ``day`` (UTC)."""
    return f"{PARENT}_{day:%Y%m%d}"


def day_of(ts: datetime | str) -> date:
    """The UTC day of an event time: a datetime, or text as ingestion keeps it (RFC 3339; the
    gateway's canonical ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` is read without parsing)."""
    if isinstance(ts, str):
        if len(ts) == 27 and ts[26] == "Z" and ts[10] == "T":
            return date(int(ts[0:4]), int(ts[5:7]), int(ts[8:10]))
        ts = parse_timestamp(ts)
    if ts.tzinfo is None:
        raise ValueError(f"event time without a time zone: {ts!r}")
    return ts.astimezone(UTC).date()


def days_of(timestamps: Iterable[datetime | str]) -> set[date]:
    """The distinct UTC days of ``timestamps`` (canonical text is grouped before it is parsed)."""
    texts: set[str] = set()
    days: set[date] = set()
    for ts in timestamps:
        if isinstance(ts, str) and len(ts) == 27 and ts[26] == "Z":
            texts.add(ts[:10])
        else:
            days.add(day_of(ts))
    days.update(date.fromisoformat(t) for t in texts)
    return days


def _key(conn: psycopg.Connection) -> tuple[str, int, str]:
    info = conn.info
    return (info.host, info.port, info.dbname)


def hot_days(conn: psycopg.Connection) -> list[date]:
    """The days that have a partition in PostgreSQL now, in order (those not archived and dropped).

    Runs in ``conn``'s transaction (with autocommit off, psycopg opens one if none is open)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (PARENT,),
    ).fetchall()
    days = []
    for (name,) in rows:
        m = _NAME.match(name)
        if m:
            days.append(datetime.strptime(m.group(1), "%Y%m%d").date())
    return sorted(days)


def missing_days(conn: psycopg.Connection, days: Iterable[date]) -> set[date]:
    """Of ``days``, those without a partition. Answered from this process's memory when it knows
    them all; otherwise the catalog is read again (another process may have created them). Safe
    inside a transaction: it only reads."""
    wanted = set(days)
    known = _known.get(_key(conn))
    if known is not None and wanted <= known:
        return set()
    known = set(hot_days(conn))
    _known[_key(conn)] = known
    return wanted - known


def forget_partitions(conn: psycopg.Connection | None = None) -> None:
    """Drop what this process remembers (of ``conn``'s database, or of all): after a partition was
    dropped, or when an insert found no partition for its row."""
    if conn is None:
        _known.clear()
    else:
        _known.pop(_key(conn), None)


def ensure_day_partitions(conn: psycopg.Connection, days: Iterable[date]) -> list[date]:
    """Create the partitions of ``days`` that do not exist yet; return the days created here.

    Must be called outside a transaction (``conn`` idle, or in autocommit): each day is created in
    its own short transaction. Concurrent creators, in this process or others, do not fail: an
    advisory lock serializes them and ``IF NOT EXISTS`` makes the later ones no-ops; a lock wait
    longer than :data:`LOCK_TIMEOUT` (a long query on ``usage_events``) is tried again.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("ensure_day_partitions must run outside a transaction")
    wanted = set(days)
    known = _known.get(_key(conn))
    if known is not None and wanted <= known:
        return []  # the common case, every batch: no round trip
    with conn.transaction():  # or psycopg would leave the read's transaction open (autocommit off)
        todo = missing_days(conn, wanted)
    created = []
    for day in sorted(todo):
        if _create(conn, day):
            created.append(day)
        _known.setdefault(_key(conn), set()).add(day)
    return created


def _create(conn: psycopg.Connection, day: date) -> bool:
    """One day's partition in its own transaction; True if this call created it."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    statement = sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(day_partition_name(day)),
        sql.Identifier(PARENT),
        sql.Literal(start.isoformat()),
        sql.Literal((start + timedelta(days=1)).isoformat()),
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                exists = conn.execute("SELECT to_regclass(%s)", (day_partition_name(day),)).fetchone()
                if exists and exists[0] is not None:
                    return False
                conn.execute(statement)
            log.info("created partition %s", day_partition_name(day))
            return True
        except (
            psycopg.errors.LockNotAvailable,
            psycopg.errors.DuplicateTable,
            psycopg.errors.UniqueViolation,
            psycopg.errors.DeadlockDetected,
        ) as exc:
            if attempt == ATTEMPTS:
                raise
            log.warning("creating %s: %s; trying again (attempt %d)", day_partition_name(day), exc, attempt)
            time.sleep(0.1 * attempt)
    return False  # not reached
