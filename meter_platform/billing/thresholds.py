"""Usage thresholds: a plan's ``{meter, quantity}`` or ``{amount}`` levels, checked against the period's
draft invoices; crossing one raises an alert exactly once per customer, period and threshold.

They go through the alert machinery (episodes and the outbox, see :mod:`meter_platform.alerts`): a
crossed threshold is a failing outcome whose check name carries customer, period and threshold, so its
episode opens once and nothing closes it; a rerun or a restart sends nothing twice.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg

from meter_platform.billing.money import decimal_str
from meter_platform.catalog import Catalog
from meter_platform.catalog.plans import Threshold
from meter_platform.quality.registry import CheckOutcome

ASSET = "invoices"


def _crossed(
    t: Threshold, quantities: dict[str, Decimal], amounts: dict[str, Decimal], total: Decimal
) -> Decimal | None:
    """The value that reached the threshold, or None."""
    if t.quantity is not None and t.meter is not None:
        value = quantities.get(t.meter, Decimal(0))
        return value if value >= t.quantity else None
    if t.amount is not None:
        value = amounts.get(t.meter, Decimal(0)) if t.meter else total
        return value if value >= t.amount else None
    return None


def crossed_thresholds(conn: psycopg.Connection, catalog: Catalog, period: str) -> list[CheckOutcome]:
    """A failing outcome per threshold that a draft invoice of ``period`` has reached."""
    out: list[CheckOutcome] = []
    for inv_id, customer, total, currency in conn.execute(
        "SELECT id, customer_id, total, currency FROM invoices WHERE period = %s AND status = 'draft'",
        (period,),
    ).fetchall():
        lines = conn.execute(
            "SELECT plan, meter, quantity, amount FROM invoice_lines WHERE invoice_id = %s AND type = 'usage'",
            (inv_id,),
        ).fetchall()
        quantities: dict[str, Decimal] = {}
        amounts: dict[str, Decimal] = {}
        for _, meter, qty, amount in lines:
            quantities[meter] = quantities.get(meter, Decimal(0)) + (qty or 0)
            amounts[meter] = amounts.get(meter, Decimal(0)) + amount
        for plan_key in sorted({line[0] for line in lines}):
            plan = catalog.plans.get(plan_key)
            for n, t in enumerate(plan.thresholds if plan else ()):
                value = _crossed(t, quantities, amounts, total)
                if value is None:
                    continue
                what = f"{t.meter} quantity {decimal_str(t.quantity)}" if t.quantity is not None else (
                    f"amount {decimal_str(t.amount or Decimal(0))} {currency}" + (f" for {t.meter}" if t.meter else "")
                )  # fmt: skip
                meta: dict[str, Any] = {"customer_id": customer, "period": period, "plan": plan_key,
                                        "value": decimal_str(value), "invoice_id": inv_id}  # fmt: skip
                out.append(
                    CheckOutcome(
                        f"usage_threshold:{customer}:{period}:{plan_key}:{n}",
                        ASSET,
                        False,
                        "WARN",
                        f"{customer} reached the {plan_key} threshold {what} in {period} (now {decimal_str(value)})",
                        meta,
                    )
                )
    return out
