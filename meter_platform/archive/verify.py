"""Checks that an archive file holds exactly what PostgreSQL holds for its day, before the partition
is dropped: the file's rows and checksum (read by DuckDB, not by the code that wrote it), the ledger
(``event_ids``: every id of the day is in exactly one part), and each active meter's counts and sums
recomputed from the files against the day's rows of ``usage_day_aggregates``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from meter_platform.archive import staging, store
from meter_platform.meters.aggregates import active_meters, minute_aggregates_sql

CHECK_TABLE = "archive_check"


@dataclass
class Verification:
    """What was compared; ``problems`` is empty when everything matched."""

    file_rows: int = 0
    file_checksum: str = "0"
    codecs: list[str] = field(default_factory=list)
    ledger_rows: int = 0
    meters_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def duckdb_summary(path: str) -> tuple[int, str]:
    """(rows, checksum) of a part file as DuckDB reads it: the file is readable by a standard Parquet
    reader other than the one that wrote it, and its ids sum to the checksum PostgreSQL computed."""
    import duckdb

    fs, _ = store.filesystem(path)
    con = duckdb.connect()
    try:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol not in ("file", "local"):
            con.register_filesystem(fs)
        row = con.execute(
            "SELECT count(*), coalesce(sum(CAST('0x' || left(md5(id), 15) AS BIGINT)::HUGEINT), 0)"
            " FROM read_parquet(?)",
            [path],
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0]), str(row[1])


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def verify_part(
    conn: psycopg.Connection,
    day: date,
    path: str,
    expected_rows: int,
    expected_checksum: str,
    earlier: list[str],
    earlier_rows: int,
) -> Verification:
    """Compare the new part file ``path`` (and the day's ``earlier`` part files, ``earlier_rows``
    rows) with PostgreSQL. Runs in the caller's transaction; leaves nothing behind."""
    v = Verification()
    info = store.file_info(path)
    v.codecs = info["codecs"]
    if v.codecs != ["ZSTD"]:
        v.problems.append(f"file not zstd-compressed: {v.codecs}")
    v.file_rows, v.file_checksum = duckdb_summary(path)
    if info["rows"] != v.file_rows:
        v.problems.append(f"footer says {info['rows']} rows, DuckDB read {v.file_rows}")
    if v.file_rows != expected_rows:
        v.problems.append(f"file has {v.file_rows} rows, the partition {expected_rows}")
    if v.file_checksum != expected_checksum:
        v.problems.append(f"file checksum {v.file_checksum}, the partition's {expected_checksum}")
    start = day_start(day)
    row = conn.execute(
        "SELECT count(*) FROM event_ids WHERE ts >= %s AND ts < %s", (start, start + timedelta(days=1))
    ).fetchone()
    v.ledger_rows = int(row[0]) if row else 0
    if v.ledger_rows != earlier_rows + v.file_rows:
        v.problems.append(
            f"event_ids has {v.ledger_rows} ids on {day}, the parts {earlier_rows + v.file_rows} rows"
        )
    _compare_meters(conn, day, [*earlier, path], v)
    return v


def _compare_meters(conn: psycopg.Connection, day: date, paths: list[str], v: Verification) -> None:
    """Each active meter's day totals per customer and dims, from the files, against usage_day_aggregates."""
    staging.create_temp(conn, CHECK_TABLE)
    try:
        staging.copy_batches(conn, CHECK_TABLE, (b for p in paths for b in store.batches(p)))
        for meter in active_meters(conn):
            params: dict[str, Any] = {"slug": meter.slug, "day": day_start(day)}
            select = minute_aggregates_sql(meter, CHECK_TABLE, params)
            diff = conn.execute(
                f"""
                WITH f AS (SELECT customer_id, dims, sum(event_count) AS event_count,
                                  sum(value_count) AS value_count, sum(value_sum) AS value_sum,
                                  min(value_min) AS value_min, max(value_max) AS value_max
                           FROM ({select}) m GROUP BY 1, 2),
                     a AS (SELECT customer_id, dims, event_count, value_count, value_sum, value_min, value_max
                           FROM usage_day_aggregates WHERE meter_slug = %(slug)s AND day = %(day)s)
                SELECT count(*) FROM f FULL JOIN a USING (customer_id, dims)
                WHERE f.event_count IS DISTINCT FROM a.event_count
                   OR f.value_count IS DISTINCT FROM a.value_count
                   OR f.value_sum IS DISTINCT FROM a.value_sum
                   OR f.value_min IS DISTINCT FROM a.value_min
                   OR f.value_max IS DISTINCT FROM a.value_max""",
                params,
            ).fetchone()
            v.meters_checked += 1
            if diff and diff[0]:
                v.problems.append(
                    f"meter {meter.slug}: {diff[0]} customer/dimension totals of {day} differ from its aggregates"
                )
    finally:
        staging.drop_temp(conn, CHECK_TABLE)


@dataclass(frozen=True)
class FileCheck:
    """A recorded part's file read back now: readable, zstd, and its rows and checksum as recorded."""

    day: date
    part: int
    path: str
    rows: int
    bytes: int
    problem: str | None  # None: the file matches its archived_days row


def check_files(conn: psycopg.Connection, day: date) -> list[FileCheck]:
    """Every part of ``day`` that still has its file, read again with DuckDB and compared with its row."""
    out = []
    for part, path, rows, size, checksum in conn.execute(
        "SELECT part, path, rows, bytes, checksum FROM archived_days"
        " WHERE day = %s AND path IS NOT NULL AND deleted_at IS NULL ORDER BY part",
        (day,),
    ).fetchall():
        problem = None
        try:
            info = store.file_info(path)
            got = duckdb_summary(path)
            if info["codecs"] != ["ZSTD"]:
                problem = f"not zstd-compressed: {info['codecs']}"
            elif got != (rows, checksum):
                problem = f"{got[0]} rows, checksum {got[1]}; recorded {rows} rows, checksum {checksum}"
        except Exception as exc:  # a missing or unreadable file is what this check reports
            problem = f"cannot read {path}: {exc}"
        out.append(FileCheck(day, part, path, rows, size, problem))
    return out
