"""What a data-quality check found, and its record in ``quality_check_results`` (which the alert sensor
reads). ERROR outcomes of the checks the registry marks as blocking hold back invoice finalization."""

from __future__ import annotations

import json

import psycopg

from meter_platform.quality.registry import BLOCKING_CHECKS, CheckOutcome


def record(conn: psycopg.Connection, outcome: CheckOutcome, run_id: str | None = None) -> None:
    """Store one evaluation (the caller commits)."""
    conn.execute(
        "INSERT INTO quality_check_results (check_name, asset, passed, severity, description, metadata, run_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            outcome.check_name,
            outcome.asset,
            outcome.passed,
            outcome.severity,
            outcome.description,
            json.dumps(outcome.metadata, default=str),
            run_id,
        ),
    )


def latest_outcomes(conn: psycopg.Connection) -> list[CheckOutcome]:
    """The newest evaluation of every check."""
    rows = conn.execute(
        "SELECT DISTINCT ON (asset, check_name) check_name, asset, passed, severity, description, metadata"
        " FROM quality_check_results ORDER BY asset, check_name, evaluated_at DESC, result_id DESC"
    ).fetchall()
    return [CheckOutcome(*row) for row in rows]


def blocking_failures(conn: psycopg.Connection) -> list[CheckOutcome]:
    """Failing ERROR checks that must be fixed before invoices are finalized."""
    return [
        o
        for o in latest_outcomes(conn)
        if not o.passed and o.severity == "ERROR" and o.check_name in BLOCKING_CHECKS
    ]
