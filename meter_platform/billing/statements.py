"""Invoices as users read them: JSON for the API, CSV for finance (one row per line), HTML to send."""

from __future__ import annotations

import csv
import html
import io
import re
from decimal import Decimal
from typing import Any

import psycopg

from meter_platform.billing.invoice import rfc3339
from meter_platform.billing.money import decimal_str, format_money
from meter_platform.billing.periods import period_bounds
from meter_platform.errors import InvalidRequest

STATUSES = ("draft", "final")
_INVOICE_COLUMNS = (
    "id, number, customer_id, period, period_start, period_end, status, currency, subtotal, total"
)
_LINE_COLUMNS = (
    "line_no, type, plan, meter, grp, description, quantity, amount, precise_amount,"
    " service_period_start, service_period_end, tiers, adjusts_period, events"
)


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else decimal_str(Decimal(value))


def _line_json(row: Any) -> dict[str, Any]:
    _, type_, plan, meter, grp, description, qty, amount, precise, s, e, tiers, adjusts, events = row
    return {
        "type": type_,
        "plan": plan,
        "meter": meter,
        "group": grp,
        "description": description,
        "quantity": _dec(qty),
        "amount": _dec(amount),
        "precise_amount": _dec(precise),
        "service_period_start": rfc3339(s),
        "service_period_end": rfc3339(e),
        "tiers": tiers,
        "adjusts_period": adjusts,
        "events": events,
    }


def _invoice_json(conn: psycopg.Connection, row: Any) -> dict[str, Any]:
    inv_id, number, customer, period, start, end, status, currency, subtotal, total = row
    lines = conn.execute(
        f"SELECT {_LINE_COLUMNS} FROM invoice_lines WHERE invoice_id = %s ORDER BY line_no", (inv_id,)
    ).fetchall()
    return {
        "id": inv_id,
        "number": number,
        "customer_id": customer,
        "period": period,
        "period_start": rfc3339(start),
        "period_end": rfc3339(end),
        "status": status,
        "currency": currency,
        "lines": [_line_json(r) for r in lines],
        "subtotal": _dec(subtotal),
        "total": _dec(total),
    }


def check_filters(period: str | None, status: str | None) -> None:
    """InvalidRequest for a period not written YYYY-MM or an unknown status."""
    if period:
        try:
            period_bounds(period)
        except ValueError as exc:
            raise InvalidRequest(str(exc), [{"field": "period", "message": str(exc)}]) from exc
    if status and status not in STATUSES:
        raise InvalidRequest(
            f"status must be draft or final, not {status!r}", [{"field": "status", "message": "unknown"}]
        )


def invoices_json(
    conn: psycopg.Connection,
    customer_id: str | None = None,
    period: str | None = None,
    status: str | None = None,
) -> list[dict[str, Any]]:
    """Invoices matching the filters, by period then customer."""
    check_filters(period, status)
    rows = conn.execute(
        f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE (%(c)s::text IS NULL OR customer_id = %(c)s)"
        " AND (%(p)s::text IS NULL OR period = %(p)s) AND (%(s)s::text IS NULL OR status = %(s)s)"
        " ORDER BY period, customer_id",
        {"c": customer_id, "p": period, "s": status},
    ).fetchall()
    return [_invoice_json(conn, r) for r in rows]


def invoice_json(conn: psycopg.Connection, invoice_id: str) -> dict[str, Any] | None:
    """One invoice by id (None when unknown)."""
    row = conn.execute(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE id = %s", (invoice_id,)).fetchone()
    return None if row is None else _invoice_json(conn, row)


CSV_COLUMNS = (
    "invoice_id", "number", "customer_id", "period", "status", "currency", "line", "type", "plan", "meter",
    "group", "description", "quantity", "amount", "precise_amount", "service_period_start",
    "service_period_end", "adjusts_period", "invoice_total",
)  # fmt: skip


def invoices_csv(invoices: list[dict[str, Any]]) -> str:
    """One row per invoice line, for a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for inv in invoices:
        for n, line in enumerate(inv["lines"], start=1):
            group = ";".join(f"{k}={v}" for k, v in (line["group"] or {}).items())
            writer.writerow([
                inv["id"], inv["number"] or "", inv["customer_id"], inv["period"], inv["status"], inv["currency"],
                n, line["type"], line["plan"], line["meter"] or "", group, line["description"],
                line["quantity"] or "", line["amount"], line["precise_amount"], line["service_period_start"],
                line["service_period_end"], line["adjusts_period"] or "", inv["total"],
            ])  # fmt: skip
    return out.getvalue()


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;margin:0;background:#f3f4f7}
.page{max-width:900px;margin:32px auto;background:#fff;padding:40px 48px;box-shadow:0 1px 4px #0002}
h1{font-size:26px;margin:0}.muted{color:#667}.draft{color:#b3261e;font-weight:700;letter-spacing:.1em}
header{display:flex;justify-content:space-between;align-items:flex-start;margin-bottom:28px}
table{width:100%;border-collapse:collapse;margin-top:8px}th,td{padding:8px 6px;vertical-align:top}
th{text-align:left;border-bottom:2px solid #1d2330;font-size:12px;text-transform:uppercase;color:#445}
td{border-bottom:1px solid #e3e5ea}.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.tiers{font-size:12px;color:#556;margin:4px 0 0 0;padding-left:16px}.totals td{border:none;font-weight:600}
.grand td{font-size:18px;border-top:2px solid #1d2330}
"""


def _tier_items(line: dict[str, Any]) -> str:
    items = []
    for t in line["tiers"] or []:
        upto = t["up_to"] if t["up_to"] is not None else "∞"
        flat = f" + flat {t['flat_fee']}" if Decimal(t["flat_fee"]) else ""
        items.append(
            f"<li>tier {t['index']} ({t['from']}, {upto}]: {t['units']} &times; {t['unit_price']}{flat} = {t['amount']}</li>"
        )
    return f"<ul class='tiers'>{''.join(items)}</ul>" if items else ""


def invoice_html(inv: dict[str, Any], customer: dict[str, Any] | None) -> str:
    """A self-contained HTML invoice: customer, period, number (or DRAFT), lines with tiers, totals."""
    e, cur = html.escape, inv["currency"]
    title = e(inv["number"]) if inv["number"] else "<span class='draft'>DRAFT</span>"
    who = e((customer or {}).get("name") or inv["customer_id"])
    email = e((customer or {}).get("email") or "")
    rows = []
    for line in inv["lines"]:
        what = e(line["description"]) + _tier_items(line)
        period = f"{line['service_period_start'][:10]} &ndash; {line['service_period_end'][:10]}"
        rows.append(
            f"<tr><td>{e(line['type'].replace('_', ' '))}</td><td>{what}<div class='muted'>{period}</div></td>"
            f"<td class='num'>{e(format(Decimal(line['quantity']), ',f') if line['quantity'] else '')}</td>"
            f"<td class='num'>{e(format_money(Decimal(line['amount']), cur))}</td></tr>"
        )
    subtotal, total = format_money(Decimal(inv["subtotal"]), cur), format_money(Decimal(inv["total"]), cur)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Invoice {e(inv["number"] or "DRAFT")} · {e(inv["customer_id"])} · {e(inv["period"])}</title>
<style>{_STYLE}</style></head><body><div class="page">
<header><div><h1>Invoice {title}</h1><div class="muted">Period {e(inv["period"])}:
{inv["period_start"][:10]} to {inv["period_end"][:10]} (UTC, end exclusive)</div></div>
<div style="text-align:right"><strong>{who}</strong><br><span class="muted">{email}</span><br>
<span class="muted">Customer {e(inv["customer_id"])}</span></div></header>
<table><thead><tr><th>Type</th><th>Description</th><th class="num">Quantity</th>
<th class="num">Amount ({e(cur)})</th></tr></thead><tbody>{"".join(rows)}</tbody>
<tbody><tr class="totals"><td></td><td class="num" colspan="2">Subtotal</td><td class="num">{subtotal}</td></tr>
<tr class="totals grand"><td></td><td class="num" colspan="2">Total {e(cur)}</td><td class="num">{total}</td></tr>
</tbody></table>
<p class="muted">Each line is rounded once, half-up, to the currency's minor unit; the total is the sum of
the rounded lines. Status: {e(inv["status"])}. Invoice id {e(inv["id"])}.</p>
</div></body></html>"""


def safe_filename(text: str) -> str:
    """Text usable in a Content-Disposition file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
