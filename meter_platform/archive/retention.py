"""Retention: archive files of days older than ``METER_RETENTION_DAYS`` are deleted, each deletion
recorded in ``archived_days.deleted_at`` and in the audit log. Aggregates are kept: sums and counts
over those days stay answerable; their raw events (unique counts, latest values, edge minutes, the
event lookup) are gone for good, which is what a retention limit means."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import psycopg

from meter_platform.access import audit
from meter_platform.archive import store
from meter_platform.archive.settings import ArchiveSettings


@dataclass(frozen=True)
class Deleted:
    """One archive file deleted by retention."""

    day: date
    part: int
    path: str
    rows: int
    bytes: int


def expired_parts(
    conn: psycopg.Connection, settings: ArchiveSettings, today: date | None = None
) -> list[Deleted]:
    """The parts retention would delete now (none when retention is not set)."""
    cutoff = settings.retention_cutoff(today)
    if cutoff is None:
        return []
    rows = conn.execute(
        "SELECT day, part, path, rows, bytes FROM archived_days"
        " WHERE day < %s AND deleted_at IS NULL AND path IS NOT NULL ORDER BY day, part",
        (cutoff,),
    ).fetchall()
    return [Deleted(*r) for r in rows]


def apply_retention(
    conn: psycopg.Connection, settings: ArchiveSettings, actor: str = "cli", today: date | None = None
) -> list[Deleted]:
    """Delete the expired parts' files; each is marked deleted and audited in its own transaction,
    after the file is gone (a crash in between leaves a row that the next run completes)."""
    done = []
    for part in expired_parts(conn, settings, today):
        store.delete(part.path)
        with conn.transaction():
            conn.execute(
                "UPDATE archived_days SET deleted_at = now() WHERE day = %s AND part = %s",
                (part.day, part.part),
            )
            audit.record(
                conn,
                actor,
                "archive.delete",
                f"usage_events/day={part.day}/part-{part.part}",
                {"path": part.path, "rows": part.rows, "bytes": part.bytes,
                 "retention_days": settings.retention_days},
            )  # fmt: skip
        done.append(part)
    return done
