"""Billing a period: draft invoices rebuilt from usage, finalized with gapless numbers, late usage of
final periods turned into adjustments. PostgreSQL only; the Dagster assets in ``defs/billing`` call it.

What is guaranteed, and where:

1. **One writer per period.** :func:`bill_period` takes a transaction-scoped advisory lock on the
   period; a second run of the same period at the same time fails with :class:`~meter_platform.errors.
   Conflict` and writes nothing.
2. **Idempotent drafts.** A draft invoice's id is derived from customer and period, and a rebuild
   deletes and rewrites its lines in the same transaction: the same usage gives the same invoice, with
   the same id, however often it runs.
3. **Final is final.** A final invoice is skipped by every later run, and a trigger refuses any change
   to it or its lines. Numbers come from a per-year counter updated in the finalizing transaction, so
   they have no gaps.
4. **Late usage is billed once.** Usage that lands in a period after its invoice was final becomes
   ``adjustment`` lines on the customer's next draft: per charge and group, price(quantity now) minus
   price(quantity billed so far), where "billed so far" is the final usage line plus every *final*
   adjustment of it. A draft's adjustments are rebuilt with the draft, so a rerun adds nothing; once
   that draft is final its adjustments count as billed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from meter_platform.billing.customers import subscriptions_in
from meter_platform.billing.invoice import Line, adjustment_lines, build_lines, totals
from meter_platform.billing.money import round_money
from meter_platform.billing.periods import Segment, Subscription, period_bounds, prorate, segments
from meter_platform.billing.usage import UsageRows, charge_usage
from meter_platform.catalog import Catalog
from meter_platform.catalog.plans import Charge, Plan
from meter_platform.errors import Conflict, InvalidRequest
from meter_platform.quality import blocking_failures
from meter_platform.storage import db

#: Events stored up to this long before an invoice was finalized are looked at again for adjustments:
#: a micro-batch that started before the finalizing transaction may commit just after it.
IN_FLIGHT_MARGIN = timedelta(hours=1)
_LOCK_SPACE = 0x62696C6C  # "bill"


def invoice_id(customer_id: str, period: str) -> str:
    """The invoice id of a customer's period: stable across rebuilds."""
    return "inv_" + hashlib.sha256(f"{customer_id}\x00{period}".encode()).hexdigest()[:24]


@dataclass
class PeriodReport:
    """What one billing run of a period did."""

    period: str
    drafts: int = 0  # draft invoices written (new or rebuilt)
    finalized: int = 0
    already_final: int = 0
    removed: int = 0  # drafts of customers no longer subscribed in the period
    totals: dict[str, tuple[str, str, str, str | None]] = field(
        default_factory=dict
    )  # customer -> (status, currency, total, number)


def _lock(conn: psycopg.Connection, period: str) -> None:
    # Both keys of the two-key lock are int4: a signed 32-bit slice of the period's hash.
    key = int.from_bytes(hashlib.sha256(period.encode()).digest()[:4], "big", signed=True)
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s::int4, %s::int4)", (_LOCK_SPACE, key)).fetchone()
    if not row or not row[0]:
        raise Conflict(
            f"another billing run of {period} is writing; this one changed nothing. Run it again after."
        )


def _plan(catalog: Catalog, key: str) -> Plan:
    plan = catalog.plans.get(key)
    if plan is None:
        raise InvalidRequest(f"a subscription names plan {key!r}, which plans.yaml no longer has; restore it")
    return plan


def _usage_lines(
    conn: psycopg.Connection, catalog: Catalog, customer: str, period: str, subs: list[Subscription]
) -> list[Line]:
    start, end = period_bounds(period)
    lines: list[Line] = []
    meters = {m.slug: m for m in catalog.meters}
    for seg in segments(subs, start, end):
        plan = _plan(catalog, seg.plan)

        def usage(charge: Charge, seg: Segment = seg) -> UsageRows:
            return charge_usage(conn, meters[charge.meter], charge, customer, seg.start, seg.end)

        lines += build_lines(plan, seg.start, seg.end, start, end, usage)
    return lines


def _group_key(group: Any) -> str:
    return json.dumps(group, sort_keys=True) if group else ""


def _billed_so_far(conn: psycopg.Connection, customer: str, period: str) -> dict[tuple, list[Any]]:
    """(plan, meter, group, service start, service end) -> [quantity, events] billed on final invoices."""
    billed: dict[tuple, list[Any]] = {}
    for plan, meter, grp, start, end, qty, events in conn.execute(
        "SELECT l.plan, l.meter, l.grp, l.service_period_start, l.service_period_end, l.quantity, l.events"
        " FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id"
        " WHERE i.customer_id = %s AND i.status = 'final' AND ((i.period = %s AND l.type = 'usage')"
        " OR (l.type = 'adjustment' AND l.meter IS NOT NULL AND l.adjusts_period = %s)) ORDER BY i.period, l.line_no",
        (customer, period, period),
    ):
        entry = billed.setdefault((plan, meter, _group_key(grp), start, end), [Decimal(0), 0, grp])
        entry[0] += qty or 0
        entry[1] += events or 0
    return billed


def _segment_amounts(conn: psycopg.Connection, customer: str, period: str) -> dict[tuple, list[Decimal]]:
    """(plan, service start, service end) -> [base fee and usage billed, minimum billed], final lines only,
    adjustments of earlier runs included (a minimum adjustment is an adjustment line without a meter)."""
    out: dict[tuple, list[Decimal]] = {}
    for plan, start, end, is_minimum, amount in conn.execute(
        "SELECT l.plan, l.service_period_start, l.service_period_end,"
        " l.type = 'minimum' OR (l.type = 'adjustment' AND l.meter IS NULL), sum(l.amount)"
        " FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id"
        " WHERE i.customer_id = %s AND i.status = 'final'"
        " AND ((i.period = %s AND l.type <> 'adjustment') OR (l.type = 'adjustment' AND l.adjusts_period = %s))"
        " GROUP BY 1, 2, 3, 4",
        (customer, period, period),
    ):
        out.setdefault((plan, start, end), [Decimal(0), Decimal(0)])[1 if is_minimum else 0] += amount
    return out


def _charge_adjustments(
    conn: psycopg.Connection, catalog: Catalog, customer: str, period: str, billed: dict[tuple, list[Any]],
    plan: Plan, meter: str, start: datetime, end: datetime,
) -> list[Line]:  # fmt: skip
    """Per group of one charge: price(usage now) - price(usage billed so far), where it is not zero."""
    charge = plan.charge(meter)
    meters = {m.slug: m for m in catalog.meters}
    if charge is None or meter not in meters:
        return []  # the charge is gone from the catalog: nothing left to price it with
    now_rows = {
        _group_key(g): (g, q, e)
        for g, q, e in charge_usage(conn, meters[meter], charge, customer, start, end)
    }
    keys = sorted(
        {k[2] for k in billed if k[:2] == (plan.key, meter) and k[3:] == (start, end)} | set(now_rows)
    )
    lines = []
    for gk in keys:
        old_q, old_e, old_g = billed.get((plan.key, meter, gk, start, end), [Decimal(0), 0, None])
        group, new_q, new_e = now_rows.get(gk, (old_g, Decimal(0), 0))
        line = adjustment_lines(
            plan, charge, Decimal(old_q), int(old_e), new_q, new_e, period,
            group=group or None, service_period_start=start, service_period_end=end,
        )  # fmt: skip
        if line is not None:
            lines.append(line)
    return lines


def _minimum_adjustment(
    plan: Plan, period: str, start: datetime, end: datetime, billed: list[Decimal], new: list[Line]
) -> Line | None:
    """The change of a segment's minimum-commitment line once late usage is added: the shortfall
    recomputed on the adjusted lines, less the minimum billed so far (so late usage that the minimum
    already paid for costs nothing more)."""
    if plan.minimum is None:
        return None
    period_start, period_end = period_bounds(period)
    committed = prorate(plan.minimum, start, end, period_start, period_end)
    lines_now = billed[0] + sum((line.amount for line in new), Decimal(0))
    shortfall = round_money(max(Decimal(0), committed - lines_now), plan.currency)
    delta = shortfall - billed[1]
    if not delta:
        return None
    return Line(
        type="adjustment",
        plan=plan.key,
        meter=None,
        group=None,
        description=(
            f"Adjustment for {period}: {plan.name} minimum commitment {round_money(committed, plan.currency)} "
            f"less {lines_now} now billed = shortfall {shortfall}; {billed[1]} was billed for it"
        ),
        quantity=None,
        amount=delta,
        precise_amount=delta,
        service_period_start=start,
        service_period_end=end,
        adjusts_period=period,
    )


def _adjustments_for(conn: psycopg.Connection, catalog: Catalog, customer: str, period: str) -> list[Line]:
    """Adjustment lines for late usage of the final ``period`` of ``customer``: per charge and group,
    then per subscription segment the change of its minimum-commitment line."""
    billed = _billed_so_far(conn, customer, period)
    amounts = _segment_amounts(conn, customer, period)
    lines: list[Line] = []
    for plan_key, start, end in sorted(amounts, key=lambda k: (k[1], k[0])):
        plan = catalog.plans.get(plan_key)
        if plan is None:
            continue  # the plan is gone from the catalog: nothing left to price it with
        meters = sorted({k[1] for k in billed if k[0] == plan_key and k[3:] == (start, end)})
        new = [
            line
            for m in meters
            for line in _charge_adjustments(conn, catalog, customer, period, billed, plan, m, start, end)
        ]
        minimum = _minimum_adjustment(plan, period, start, end, amounts[(plan_key, start, end)], new)
        lines += new + ([minimum] if minimum else [])
    return lines


def _late_periods(conn: psycopg.Connection, customer: str, period: str) -> list[str]:
    """Final periods before ``period`` with usage stored since they were finalized, whose next draft
    (the first period after them without a final invoice) is ``period``."""
    rows = conn.execute(
        "SELECT i.period FROM invoices i WHERE i.customer_id = %s AND i.status = 'final' AND i.period < %s"
        " AND EXISTS (SELECT 1 FROM usage_events e WHERE e.customer_id = i.customer_id"
        "   AND e.ts >= i.period_start AND e.ts < i.period_end AND e.stored_at >= i.finalized_at - %s"
        "   UNION ALL SELECT 1 FROM archived_customer_days a WHERE a.customer_id = i.customer_id"  # archived days
        "   AND a.day >= CAST(i.period_start AT TIME ZONE 'UTC' AS date)"
        "   AND a.day < CAST(i.period_end AT TIME ZONE 'UTC' AS date) AND a.last_stored_at >= i.finalized_at - %s)"
        " AND NOT EXISTS (SELECT 1 FROM invoices d WHERE d.customer_id = i.customer_id"
        "   AND d.status = 'draft' AND d.period > i.period AND d.period < %s)"
        " ORDER BY i.period",
        (customer, period, IN_FLIGHT_MARGIN, IN_FLIGHT_MARGIN, period),
    ).fetchall()
    return [r[0] for r in rows]


def _write_draft(
    conn: psycopg.Connection, customer: str, period: str, currency: str, lines: list[Line]
) -> str:
    start, end = period_bounds(period)
    subtotal, total = totals(lines, currency)
    inv = invoice_id(customer, period)
    conn.execute("DELETE FROM invoice_lines WHERE invoice_id = %s", (inv,))
    conn.execute(
        "INSERT INTO invoices (id, customer_id, period, period_start, period_end, status, currency, subtotal, total)"
        " VALUES (%s, %s, %s, %s, %s, 'draft', %s, %s, %s) ON CONFLICT (id) DO UPDATE SET currency = EXCLUDED.currency,"
        " subtotal = EXCLUDED.subtotal, total = EXCLUDED.total, updated_at = now()",
        (inv, customer, period, start, end, currency, subtotal, total),
    )
    with conn.cursor().copy(
        "COPY invoice_lines (invoice_id, line_no, type, plan, meter, grp, description, quantity, events, amount,"
        " precise_amount, service_period_start, service_period_end, tiers, adjusts_period) FROM STDIN"
    ) as copy:
        for n, line in enumerate(lines, start=1):
            j = line.as_json()
            copy.write_row((
                inv, n, line.type, line.plan, line.meter, json.dumps(line.group) if line.group else None,
                line.description, line.quantity, line.events, line.amount, line.precise_amount,
                line.service_period_start, line.service_period_end, json.dumps(j["tiers"]), line.adjusts_period,
            ))  # fmt: skip
    return inv


def _currency(catalog: Catalog, customer: str, period: str, subs: list[Subscription]) -> str:
    currencies = {_plan(catalog, sub.plan).currency for sub in subs}
    if len(currencies) != 1:
        raise InvalidRequest(
            f"{customer}'s plans in {period} bill in {sorted(currencies)}; one currency per invoice"
        )
    return currencies.pop()


def _next_number(conn: psycopg.Connection, year: int) -> str:
    row = conn.execute(
        "INSERT INTO invoice_numbers (year, last_number) VALUES (%s, 1) ON CONFLICT (year)"
        " DO UPDATE SET last_number = invoice_numbers.last_number + 1 RETURNING last_number",
        (year,),
    ).fetchone()
    assert row is not None
    return f"INV-{year}-{row[0]:06d}"


def check_finalizable(conn: psycopg.Connection, period: str, now: datetime, grace: timedelta) -> None:
    """Raise unless ``period`` is closed plus grace and no blocking data-quality check fails."""
    _, end = period_bounds(period)
    if now < end + grace:
        raise InvalidRequest(
            f"{period} cannot be finalized before {(end + grace).isoformat()} (the period ends at "
            f"{end.isoformat()}, plus a grace of {grace} for late events; METER_BILLING_GRACE sets it)"
        )
    blocking = blocking_failures(conn)
    if blocking:
        names = ", ".join(o.check_name for o in blocking)
        raise Conflict(
            f"finalizing {period} is blocked by failing data-quality checks: {names}; fix them first"
        )


def _bill_customer(
    conn: psycopg.Connection, catalog: Catalog, customer: str, period: str, subs: list[Subscription]
) -> tuple[str, list[Line]]:
    lines = _usage_lines(conn, catalog, customer, period, subs)
    for late in _late_periods(conn, customer, period):
        lines += _adjustments_for(conn, catalog, customer, late)
    return _currency(catalog, customer, period, subs), lines


def bill_period(
    database_url: str,
    catalog: Catalog,
    period: str,
    *,
    finalize: bool = False,
    now: datetime | None = None,
    grace: timedelta = timedelta(hours=1),
) -> PeriodReport:
    """Rebuild the drafts of ``period`` for every customer subscribed in it, in one transaction; with
    ``finalize``, then number and finalize them (refused before the period closed plus ``grace``, or
    while a blocking data-quality check fails). Final invoices are left as they are."""
    now = now or datetime.now(UTC)
    start, end = period_bounds(period)
    report = PeriodReport(period)
    with db.connect(database_url) as conn, conn.transaction():
        _lock(conn, period)
        if finalize:
            check_finalizable(conn, period, now, grace)
        subs = subscriptions_in(conn, start, end)
        subscribed = sorted(subs)
        status: dict[str, str] = dict(
            conn.execute("SELECT customer_id, status FROM invoices WHERE period = %s", (period,)).fetchall()
        )
        for customer in subscribed:
            if status.get(customer) == "final":
                report.already_final += 1
                continue
            currency, lines = _bill_customer(conn, catalog, customer, period, subs[customer])
            _write_draft(conn, customer, period, currency, lines)
            report.drafts += 1
        gone = [c for c, s in status.items() if s == "draft" and c not in subscribed]
        for customer in gone:
            conn.execute("DELETE FROM invoice_lines WHERE invoice_id = %s", (invoice_id(customer, period),))
            conn.execute("DELETE FROM invoices WHERE id = %s", (invoice_id(customer, period),))
        report.removed = len(gone)
        if finalize:
            for (inv,) in conn.execute(
                "SELECT id FROM invoices WHERE period = %s AND status = 'draft' ORDER BY customer_id",
                (period,),
            ).fetchall():
                conn.execute(
                    "UPDATE invoices SET status = 'final', number = %s, finalized_at = %s, updated_at = now()"
                    " WHERE id = %s",
                    (_next_number(conn, now.year), now, inv),
                )
                report.finalized += 1
        for customer, st, currency, total, number in conn.execute(
            "SELECT customer_id, status, currency, total, number FROM invoices WHERE period = %s ORDER BY customer_id",
            (period,),
        ):
            report.totals[customer] = (st, currency, str(total), number)
    return report


def period_is_final(conn: psycopg.Connection, period: str) -> bool:
    """Every invoice of ``period`` is final (and there is at least one)."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'final') FROM invoices WHERE period = %s", (period,)
    ).fetchone()
    return bool(row and row[0] and row[0] == row[1])
