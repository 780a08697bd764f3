"""The gateway's reads of archived days (``meter_platform.archive.reader``): usage queries whose raw-event
ranges reach them, and the lookup of an archived event by id.

The common case is untouched: a usage query whose raw-event ranges cannot reach an archived day
(recent ranges; minute-aligned ranges of count, sum, min, max and avg meters) runs on the gateway's
pool as before. Otherwise the archived parts of the range are looked up before and after the query;
if there are none either time, the answer stands (no day of the range was archived in between).
When there are, the query runs in a worker thread on a connection of its own, where the archived
rows are staged next to ``usage_events`` (files are read off the event loop).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from ingest_gateway.gateway import Gateway
from meter_platform.archive import reader
from meter_platform.meters.aggregates import sqlalchemy_bind
from meter_platform.meters.usage import UsageQuery, usage_sql


async def usage_rows(gw: Gateway, q: UsageQuery) -> list[Any]:
    """The rows of ``usage_sql(q)``, archived days included."""
    sql, params = usage_sql(q)
    ranges = reader.raw_ranges(q)
    if not ranges:
        return await gw.query(sql, params)
    parts_sql, parts_params = reader.parts_sql(ranges, sqlalchemy_bind)
    if not await gw.query(parts_sql, parts_params):
        rows = await gw.query(sql, params)
        if not await gw.query(parts_sql, parts_params):
            return rows
    database_url = gw.settings.database_url
    assert database_url is not None
    return await asyncio.to_thread(reader.usage_rows_at, database_url, q)


#: The parts of the day of an event (by its ts in event_ids) that still have their files.
_EVENT_PARTS = (
    "SELECT a.day, a.part, a.path, e.ts FROM event_ids e"
    " JOIN archived_days a ON a.day = CAST(e.ts AT TIME ZONE 'UTC' AS date)"
    " WHERE e.id = :id AND a.path IS NOT NULL AND a.deleted_at IS NULL AND a.rows > 0 ORDER BY a.part"
)


async def archived_event(gw: Gateway, event_id: str) -> SimpleNamespace | None:
    """The stored row of ``event_id`` read from its day's archive files (attributes as the columns of
    usage_events), or None when its day is not archived."""
    rows = await gw.query(_EVENT_PARTS, {"id": event_id})
    if not rows:
        return None
    parts = [reader.Part(r.day, r.part, r.path) for r in rows]
    found = await asyncio.to_thread(reader.read_event, parts, event_id, rows[0].ts)
    return None if found is None else SimpleNamespace(**found)
