"""The audit log of admin actions: who (a key id, or ``cli``), what, when."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from meter_platform.capture.envelope import format_timestamp


def record(
    conn: psycopg.Connection, actor: str, action: str, target: str | None = None, details: Any = None
) -> None:
    """Add one row (in the caller's transaction)."""
    conn.execute(
        "INSERT INTO audit_log (actor, action, target, details) VALUES (%s, %s, %s, %s)",
        (actor, action, target, Jsonb(details or {})),
    )


def record_now(
    database_url: str, actor: str, action: str, target: str | None = None, details: Any = None
) -> None:
    """Add one row in a transaction of its own."""
    from meter_platform.storage import db

    with db.connect(database_url) as conn:
        record(conn, actor, action, target, details)
        conn.commit()


def list_audit(conn: psycopg.Connection, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Rows newest first."""
    rows = conn.execute(
        "SELECT audit_id, at, actor, action, target, details FROM audit_log"
        " ORDER BY at DESC, audit_id DESC LIMIT %s OFFSET %s",
        (limit, offset),
    ).fetchall()
    return [
        {
            "id": r[0],
            "at": format_timestamp(r[1]),
            "actor": r[2],
            "action": r[3],
            "target": r[4],
            "details": r[5],
        }
        for r in rows
    ]
