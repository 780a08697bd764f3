"""Checks on a billing period's invoices, as plain functions over PostgreSQL (the Dagster asset checks
of ``invoices`` report them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from meter_platform.billing.customers import subscriptions_in
from meter_platform.billing.periods import period_bounds
from meter_platform.quality.registry import BLOCKING_CHECKS


@dataclass(frozen=True)
class InvoiceCheck:
    """One check's finding on a period's invoices."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def totals_equal_lines(conn: psycopg.Connection, period: str) -> InvoiceCheck:
    """Every invoice's total is the sum of its rounded lines, its subtotal the sum without adjustments."""
    bad = conn.execute(
        "SELECT i.id FROM invoices i LEFT JOIN invoice_lines l ON l.invoice_id = i.id WHERE i.period = %s"
        " GROUP BY i.id, i.total, i.subtotal HAVING i.total <> coalesce(sum(l.amount), 0)"
        " OR i.subtotal <> coalesce(sum(l.amount) FILTER (WHERE l.type <> 'adjustment'), 0) ORDER BY i.id",
        (period,),
    ).fetchall()
    ids = [r[0] for r in bad]
    return InvoiceCheck(
        "invoice_totals_equal_their_lines",
        not ids,
        f"{len(ids)} invoice(s) of {period} whose total differs from the sum of their lines: {', '.join(ids[:5])}"
        if ids
        else f"every invoice of {period} adds up",
        {"mismatched": ids[:20]},
    )


def one_invoice_per_subscribed_customer(conn: psycopg.Connection, period: str) -> InvoiceCheck:
    """Each customer with a subscription in the period has one invoice, and nobody else has one."""
    start, end = period_bounds(period)
    subscribed = set(subscriptions_in(conn, start, end))
    invoiced = {r[0] for r in conn.execute("SELECT customer_id FROM invoices WHERE period = %s", (period,))}
    missing, extra = sorted(subscribed - invoiced), sorted(invoiced - subscribed)
    ok = not missing and not extra
    return InvoiceCheck(
        "one_invoice_per_subscribed_customer",
        ok,
        f"{len(subscribed)} subscribed customers, {len(invoiced)} invoices"
        + (
            "" if ok else f"; without an invoice: {missing[:5]}; invoiced without a subscription: {extra[:5]}"
        ),
        {
            "subscribed": len(subscribed),
            "invoices": len(invoiced),
            "missing": missing[:20],
            "extra": extra[:20],
        },
    )


def finalized_only_with_quality_passing(conn: psycopg.Connection, period: str) -> InvoiceCheck:
    """No invoice of the period was finalized while a blocking data-quality check (ledger continuity,
    reconciliation) was failing: its latest outcome before the finalization must have passed."""
    bad = conn.execute(
        "SELECT DISTINCT i.id FROM invoices i CROSS JOIN unnest(%s::text[]) AS b(check_name)"
        " JOIN LATERAL (SELECT passed FROM quality_check_results r WHERE r.check_name = b.check_name"
        "   AND r.evaluated_at <= i.finalized_at ORDER BY r.evaluated_at DESC, r.result_id DESC LIMIT 1) q ON true"
        " WHERE i.period = %s AND i.status = 'final' AND NOT q.passed ORDER BY 1",
        (list(BLOCKING_CHECKS), period),
    ).fetchall()
    ids = [r[0] for r in bad]
    return InvoiceCheck(
        "finalized_only_with_quality_passing",
        not ids,
        f"{len(ids)} invoice(s) of {period} were finalized while a blocking check failed"
        if ids
        else f"no invoice of {period} was finalized while {', '.join(BLOCKING_CHECKS)} failed",
        {"invoices": ids[:20]},
    )


def invoice_checks(conn: psycopg.Connection, period: str) -> list[InvoiceCheck]:
    """Every check of the period's invoices."""
    return [
        totals_equal_lines(conn, period),
        one_invoice_per_subscribed_customer(conn, period),
        finalized_only_with_quality_passing(conn, period),
    ]
