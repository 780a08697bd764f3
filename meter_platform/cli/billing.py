"""``meter bill``, ``meter invoices``, ``meter customers``: billing from the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime

from meter_platform.cli.common import database_url, print_table
from meter_platform.config import load_billing_settings, load_settings


def _platform_env(db_url: str) -> None:
    """Point this process at the running platform's Dagster instance and catalog, as its runs see them."""
    from meter_platform.runtime.up import dagster_database_url, dagster_home, max_concurrent_runs

    os.environ.setdefault("METER_DATABASE_URL", db_url)
    os.environ.setdefault("METER_DAGSTER_DATABASE_URL", dagster_database_url(db_url))
    os.environ.setdefault("METER_MAX_CONCURRENT_RUNS", max_concurrent_runs())
    os.environ.setdefault("METER_CATALOG_DIR", str(load_settings().catalog_dir.resolve()))
    os.environ.setdefault("DAGSTER_HOME", str(dagster_home()))


def cmd_bill(args: argparse.Namespace) -> int:
    from meter_platform.billing.invoicing import check_finalizable
    from meter_platform.billing.periods import period_bounds
    from meter_platform.errors import PlatformError
    from meter_platform.storage import db

    try:
        period_bounds(args.period)
    except ValueError as exc:
        print(f"meter bill: {exc}", file=sys.stderr)
        return 2
    url = database_url()
    if args.finalize:
        with db.connect(url) as conn:
            try:
                check_finalizable(conn, args.period, datetime.now(UTC), load_billing_settings().grace)
            except PlatformError as exc:
                print(f"meter bill: {exc}", file=sys.stderr)
                return 2
    _platform_env(url)
    from meter_platform.defs.billing.launch import run_billing_job

    what = "finalizing" if args.finalize else "billing"
    print(f"{what} {args.period} with billing_job on the Dagster instance ...", flush=True)
    ok, run_id, error = run_billing_job(args.period, args.finalize)
    if not ok:
        print(f"meter bill: run {run_id} failed: {error}", file=sys.stderr)
        return 1
    print(f"run {run_id} succeeded (see it in the Dagster UI under Runs)")
    if args.finalize:
        from meter_platform.access import audit

        audit.record_now(url, "cli", "invoices.finalize", args.period, {"run_id": run_id})
    return _print_invoices(url, args.period, None, None, totals_only=True)


def _print_invoices(
    url: str, period: str | None, customer: str | None, status: str | None, totals_only: bool = False
) -> int:
    from meter_platform.billing.statements import invoices_json
    from meter_platform.storage import db

    with db.connect(url) as conn:
        invoices = invoices_json(conn, customer, period, status)
    if not invoices:
        print("(no invoices match)")
        return 0
    header = ["customer", "period", "status", "number", "currency", "lines", "subtotal", "total", "id"]
    rows = [
        [i["customer_id"], i["period"], i["status"], i["number"] or "DRAFT", i["currency"], len(i["lines"]),
         i["subtotal"], i["total"], i["id"]]
        for i in invoices
    ]  # fmt: skip
    print_table(header[:-1] if totals_only else header, [r[:-1] for r in rows] if totals_only else rows)
    return 0


def cmd_invoices(args: argparse.Namespace) -> int:
    from meter_platform.billing.statements import invoices_json
    from meter_platform.errors import PlatformError
    from meter_platform.storage import db

    url = database_url()
    try:
        if args.json:
            with db.connect(url) as conn:
                print(
                    json.dumps(
                        {"invoices": invoices_json(conn, args.customer, args.period, args.status)}, indent=2
                    )
                )
            return 0
        return _print_invoices(url, args.period, args.customer, args.status)
    except PlatformError as exc:
        print(f"meter invoices: {exc}", file=sys.stderr)
        return 2


def cmd_customers(args: argparse.Namespace) -> int:
    from meter_platform.billing.customers import list_customers
    from meter_platform.storage import db

    with db.connect(database_url()) as conn:
        customers = list_customers(conn)
    if args.json:
        print(json.dumps({"customers": customers}, indent=2))
        return 0
    rows = []
    for c in customers:
        running = [s for s in c["subscriptions"] if s["ends_at"] is None]
        rows.append([c["id"], c["name"] or "", c["email"] or "", running[0]["plan"] if running else "-",
                     running[0]["starts_at"] if running else "", len(c["subscriptions"])])  # fmt: skip
    print_table(["id", "name", "email", "plan", "since", "subscriptions"], rows)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser(
        "bill",
        help="run billing for a month (drafts, or --finalize) through Dagster and print each customer's total",
        description="Runs billing_job for the month's partition on the platform's Dagster instance (it shows "
        "in the UI), waits, and prints the invoices. Drafts are rebuilt from usage; --finalize numbers them, "
        "and is refused before the month's end plus METER_BILLING_GRACE.",
    )
    p.add_argument("--period", required=True, help="the month, YYYY-MM (UTC)")
    p.add_argument("--finalize", action="store_true", help="number and finalize the month's invoices")
    p.set_defaults(func=cmd_bill)
    p = sub.add_parser("invoices", help="invoices as a table (or JSON), from the database")
    p.add_argument("--period", help="only this month, YYYY-MM")
    p.add_argument("--customer", help="only this customer")
    p.add_argument("--status", choices=["draft", "final"], help="only drafts or only final invoices")
    p.add_argument("--json", action="store_true", help="print them as GET /v1/invoices answers")
    p.set_defaults(func=cmd_invoices)
    p = sub.add_parser("customers", help="the customer registry with each customer's running plan")
    p.add_argument("--json", action="store_true", help="print them as GET /v1/customers answers")
    p.set_defaults(func=cmd_customers)
