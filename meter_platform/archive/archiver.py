"""Archiving a day: its partition of ``usage_events`` to a Parquet file, verified, then dropped.

For one UTC day older than ``METER_HOT_DAYS``:

1. **Export**, in one repeatable-read transaction: the partition's row count and checksum, and its
   rows as a COPY stream read into Arrow in blocks (memory bounded by a block), sorted by event type,
   customer and time, into ``part-<n>.parquet`` (zstd) under a temporary name, renamed when complete.
2. **Verify** the file as written (:mod:`meter_platform.archive.verify`): rows and checksum read back
   by DuckDB equal the partition's, the day's ids in ``event_ids`` equal the rows of all its parts,
   and every active meter's totals recomputed from the files equal ``usage_day_aggregates``.
   Anything else: the file is removed and the partition stays (:class:`ArchiveMismatch`).
3. **Swap**, in one transaction: lock the partition against writes, check it still has the rows that
   were exported, record the part in ``archived_days`` (and per customer, its events and the newest
   ``stored_at``, in ``archived_customer_days``, for billing's late-usage test), detach and drop the
   partition. Readers see
   either the partition or the archived part, never neither (``meter_platform.archive.reader``).

Events stored for the day later (a quarantine replay recreates its partition) make a second part the
next time the day is archived. The ids stay in ``event_ids``: a resend of an archived event is still a
duplicate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from meter_platform.archive import store
from meter_platform.archive.settings import MIN_HOT_DAYS, ArchiveSettings
from meter_platform.archive.verify import Verification, verify_part
from meter_platform.errors import PlatformError
from meter_platform.storage.partitions import day_partition_name, forget_partitions, hot_days

LOCK_TIMEOUT = "5s"
SWAP_ATTEMPTS = 5
Progress = Callable[[str], None]


class ArchiveMismatch(PlatformError):
    """The file does not match PostgreSQL: nothing was dropped."""

    status = 409


@dataclass
class DayArchive:
    """The outcome for one day: ``archived``, or why not (``not_eligible``, ``no_partition``)."""

    day: date
    status: str
    part: int = 0
    path: str | None = None
    rows: int = 0
    bytes: int = 0
    table_bytes: int = 0  # the partition's size in PostgreSQL (heap and TOAST, without indexes)
    checksum: str = "0"
    seconds: float = 0.0
    verification: Verification | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float | None:
        """How many times smaller the file is than the partition's table was."""
        return round(self.table_bytes / self.bytes, 2) if self.bytes else None

    def line(self) -> str:
        """One line for a terminal or a log."""
        if self.status != "archived":
            return f"{self.day}: {self.status}" + (f" ({'; '.join(self.problems)})" if self.problems else "")
        if not self.rows:
            return f"{self.day}: archived (no events), partition dropped"
        return (
            f"{self.day}: archived part {self.part}: {self.rows} events, {self.bytes:,} bytes "
            f"({self.compression_ratio}x smaller than in PostgreSQL) in {self.seconds:.1f} s -> {self.path}"
        )


def eligible_days(
    conn: psycopg.Connection, settings: ArchiveSettings, today: date | None = None
) -> list[date]:
    """Days that have a partition and are older than ``today`` minus the hot days (UTC)."""
    cutoff = settings.cutoff(today)
    return [d for d in hot_days(conn) if d < cutoff]


def _next_part(conn: psycopg.Connection, day: date) -> tuple[int, list[str], int]:
    """The day's next part number, the files of its earlier parts and their rows."""
    rows = conn.execute(
        "SELECT part, path, rows, deleted_at FROM archived_days WHERE day = %s ORDER BY part", (day,)
    ).fetchall()
    if any(r[3] is not None and r[2] for r in rows):
        raise ArchiveMismatch(
            f"{day}: an earlier part's file was deleted by retention; cannot verify a new part"
        )
    return (max((r[0] for r in rows), default=0) + 1, [r[1] for r in rows if r[1]], sum(r[2] for r in rows))


def _export(
    conn: psycopg.Connection, result: DayArchive, settings: ArchiveSettings, progress: Progress
) -> None:
    """Step 1: count, checksum and rows of the partition, in one snapshot, into the part file."""
    table = sql.Identifier(day_partition_name(result.day))
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute(
            sql.SQL("SELECT count(*), {}, pg_table_size({}) FROM {}").format(
                sql.SQL(store.CHECKSUM_SQL), sql.Literal(day_partition_name(result.day)), table
            )
        ).fetchone()
        assert row is not None
        result.rows, result.checksum, result.table_bytes = int(row[0]), str(row[1]), int(row[2])
        if not result.rows:
            return
        writer = store.PartWriter(settings.url, result.day, result.part)
        try:
            # PostgreSQL's CSV straight into Arrow (no Python object per value); timestamps as
            # "2026-10-09 00:00:01.123456+00", which Arrow reads as UTC microseconds.
            conn.execute("SET LOCAL TimeZone = 'UTC'")
            conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
            statement = sql.SQL(
                "COPY (SELECT id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq,"
                " stored_at FROM {} ORDER BY event_type, customer_id, ts, id) TO STDOUT (FORMAT csv)"
            ).format(table)
            with conn.cursor() as cur, cur.copy(statement) as copy:
                for batch in store.csv_batches(copy):
                    writer.write_batch(batch)
                    progress(f"{result.day}: {writer.rows}/{result.rows} events written")
            result.bytes = writer.commit()
        except BaseException:
            writer.abort()
            raise
        result.path = writer.path


def _swap(conn: psycopg.Connection, result: DayArchive) -> None:
    """Step 3: record the part and drop the partition, if it still holds exactly what was exported."""
    name = day_partition_name(result.day)
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
                conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(name)))
                row = conn.execute(
                    sql.SQL("SELECT count(*), {} FROM {}").format(
                        sql.SQL(store.CHECKSUM_SQL), sql.Identifier(name)
                    )
                ).fetchone()
                if row is None or (int(row[0]), str(row[1])) != (result.rows, result.checksum):
                    raise ArchiveMismatch(
                        f"{result.day}: events were stored in the partition while it was archived"
                    )
                conn.execute(
                    "INSERT INTO archived_days (day, part, path, rows, bytes, checksum) VALUES (%s, %s, %s, %s, %s, %s)",
                    (result.day, result.part, result.path, result.rows, result.bytes, result.checksum),
                )
                conn.execute(
                    sql.SQL(
                        "INSERT INTO archived_customer_days (day, part, customer_id, events, last_stored_at)"
                        " SELECT %s, %s, customer_id, count(*), max(stored_at) FROM {} GROUP BY customer_id"
                    ).format(sql.Identifier(name)),
                    (result.day, result.part),
                )
                conn.execute(
                    sql.SQL("ALTER TABLE usage_events DETACH PARTITION {}").format(sql.Identifier(name))
                )
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            forget_partitions(conn)
            return
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if attempt == SWAP_ATTEMPTS:
                raise
            time.sleep(attempt)


def archive_day(
    conn: psycopg.Connection,
    day: date,
    settings: ArchiveSettings,
    progress: Progress | None = None,
    today: date | None = None,
) -> DayArchive:
    """Archive ``day`` if it is eligible (see the module doc), over an autocommit connection.

    Raises :class:`ArchiveMismatch` (the partition stays, the file is removed) when verification fails.
    """
    if not conn.autocommit:
        raise ValueError("archive_day needs a connection in autocommit mode (it runs its own transactions)")
    if settings.hot_days < MIN_HOT_DAYS:  # readers skip the archive for ranges from yesterday on
        raise ValueError(f"at least {MIN_HOT_DAYS} day(s) stay hot; got hot_days={settings.hot_days}")
    say = progress or (lambda _: None)
    started = time.monotonic()
    if day >= settings.cutoff(today):
        return DayArchive(
            day, "not_eligible", problems=[f"not older than {settings.hot_days} days (METER_HOT_DAYS)"]
        )
    if day not in hot_days(conn):
        return DayArchive(
            day, "no_partition", problems=["no hot partition (archived already, or never had events)"]
        )
    with conn.transaction():
        part, earlier, earlier_rows = _next_part(conn, day)
    result = DayArchive(day, "archived", part=part)
    _export(conn, result, settings, say)
    try:
        if result.path is not None:
            say(f"{day}: verifying {result.path}")
            with conn.transaction():
                result.verification = verify_part(
                    conn, day, result.path, result.rows, result.checksum, earlier, earlier_rows
                )
            if not result.verification.ok:
                raise ArchiveMismatch(f"{day}: " + "; ".join(result.verification.problems))
        _swap(conn, result)
    except BaseException:
        if result.path is not None:
            store.delete(result.path)
        raise
    result.seconds = time.monotonic() - started
    return result


def archive_eligible(
    conn: psycopg.Connection,
    settings: ArchiveSettings,
    progress: Progress | None = None,
    today: date | None = None,
) -> list[DayArchive]:
    """Archive every eligible day, oldest first; a day that fails verification is reported and skipped."""
    results = []
    for day in eligible_days(conn, settings, today):
        try:
            results.append(archive_day(conn, day, settings, progress, today))
        except ArchiveMismatch as exc:
            results.append(DayArchive(day, "mismatch", problems=[str(exc)]))
        if progress:
            progress(results[-1].line())
    return results


def summary(results: list[DayArchive]) -> dict[str, Any]:
    """Totals of a run, for logs and metadata."""
    archived = [r for r in results if r.status == "archived"]
    return {
        "days_archived": len(archived),
        "events": sum(r.rows for r in archived),
        "bytes": sum(r.bytes for r in archived),
        "failed": [str(r.day) for r in results if r.status == "mismatch"],
    }
