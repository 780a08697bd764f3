"""Archived rows back into PostgreSQL: record batches of part files copied into a temporary table
shaped like ``usage_events``, so the platform's own SQL (the meters' filters and values, the usage
query) runs over them unchanged. Batches go through COPY as CSV, one at a time: memory stays bounded
by a batch whatever the number of rows."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from meter_platform.archive.store import COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa


def create_temp(conn: psycopg.Connection, table: str) -> None:
    """An empty temporary table ``table`` with the columns of usage_events (dropped first if there)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(table)))
    conn.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE usage_events)").format(sql.Identifier(table)))


def drop_temp(conn: psycopg.Connection, table: str) -> None:
    """Drop the temporary table."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(table)))


def copy_batches(conn: psycopg.Connection, table: str, batches: Iterable[pa.RecordBatch]) -> int:
    """COPY the batches (all of :data:`COLUMNS`) into ``table``; return the number of rows."""
    import pyarrow.csv as pcsv

    rows, header = 0, True
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for batch in batches:
            if not batch.num_rows:
                continue
            buf = io.BytesIO()
            # One CSV document per batch (each with its header line, which COPY skips only once): so
            # write the header with the first batch only.
            pcsv.write_csv(
                batch.select(list(COLUMNS)),
                buf,
                pcsv.WriteOptions(include_header=header, quoting_style="needed"),
            )
            copy.write(buf.getvalue())
            header = False
            rows += batch.num_rows
    return rows
