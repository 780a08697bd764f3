"""Data-quality checks as plain functions over PostgreSQL (no Dagster import), and their record.

Each check returns a :class:`CheckOutcome`; ``record`` stores it in ``quality_check_results``, which the
alert sensor reads. ERROR outcomes of reconciliation and ledger continuity block finalizing invoices
(:func:`blocking_failures`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg

#: Checks whose failure (severity ERROR) blocks finalizing invoices.
BLOCKING_CHECKS = ("aggregates_reconcile_with_raw_events", "ledger_continuity")


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check evaluation."""

    check_name: str
    asset: str
    passed: bool
    severity: str  # "ERROR" or "WARN"
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


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
