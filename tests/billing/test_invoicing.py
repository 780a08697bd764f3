"""Billing a period against the real PostgreSQL: drafts recomputable by hand, reruns that change
nothing, finalization with gapless numbers, late events as exactly one adjustment, one writer per period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from meter_platform.billing import customers, invoicing
from meter_platform.errors import Conflict, InvalidRequest, NotFound
from meter_platform.storage import db
from tests.billing.support import AFTER_GRACE, MAR_16, MARCH, amounts, invoices, put, send, ts
from tests.helpers import api_call


def test_draft_invoices_equal_a_recomputation_by_hand(march, database_url):
    report = invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    assert (report.drafts, report.finalized) == (2, 0)
    got = invoices(database_url)
    a, b = got["a"], got["b"]
    # a, basic, all month: base 10.00; api_calls graduated q=5: 2 x 1.00 + 0.50 flat + 3 x 0.10 = 2.80;
    # bytes by region: eu-west-1 2000 x 0.001 = 2.00, us-east-1 6144 x 0.001 = 6.144 -> 6.14.
    # 20.94 is above the minimum of 20.00: no minimum line.
    assert amounts(a) == [
        ("base_fee", None, "10.00"),
        ("usage", "api_calls", "2.80"),
        ("usage", "bytes_transferred", "2.00"),
        ("usage", "bytes_transferred", "6.14"),
    ]
    assert [line["group"] for line in a["lines"][2:]] == [{"region": "eu-west-1"}, {"region": "us-east-1"}]
    assert a["lines"][3]["precise_amount"] == "6.144" and a["lines"][3]["quantity"] == "6144"
    assert (a["subtotal"], a["total"], a["status"], a["number"], a["currency"]) == (
        "20.94",
        "20.94",
        "draft",
        None,
        "USD",
    )
    # b, basic for 15 of 31 days: base 10.00 x 15/31 = 4.8387.. -> 4.84; api_calls q=1: 1.00 + 0.50 = 1.50;
    # bytes 0 -> 0.00. The prorated minimum 20.00 x 15/31 = 9.677419.. exceeds 6.34: minimum line 3.34.
    # Then pro for 16 of 31 days: base 31.00 x 16/31 = 16.00; api_calls volume q=4: 4 x 1.50 = 6.00.
    assert amounts(b) == [
        ("base_fee", None, "4.84"),
        ("usage", "api_calls", "1.50"),
        ("usage", "bytes_transferred", "0.00"),
        ("minimum", None, "3.34"),
        ("base_fee", None, "16.00"),
        ("usage", "api_calls", "6.00"),
    ]
    assert b["total"] == "31.68"
    tiers = b["lines"][5]["tiers"]
    assert [(t["index"], t["units"], t["unit_price"]) for t in tiers] == [(2, "4", "1.50")]
    assert b["lines"][4]["service_period_start"] == "2026-03-16T00:00:00.000000Z"
    assert b["lines"][0]["service_period_end"] == "2026-03-16T00:00:00.000000Z"
    for inv in got.values():  # every total is the sum of its rounded lines
        assert Decimal(inv["total"]) == sum(Decimal(line["amount"]) for line in inv["lines"])


def test_rerun_gives_the_same_invoices_and_finalizing_numbers_them_once(march, database_url):
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    first = invoices(database_url)
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    assert invoices(database_url) == first
    with pytest.raises(InvalidRequest, match="grace"):
        invoicing.bill_period(
            database_url, march, MARCH, finalize=True, now=datetime(2026, 4, 1, 0, 30, tzinfo=UTC)
        )
    assert {i["status"] for i in invoices(database_url).values()} == {"draft"}
    report = invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    assert report.finalized == 2
    final = invoices(database_url)
    assert [(c, i["number"], i["status"]) for c, i in sorted(final.items())] == [
        ("a", "INV-2026-000001", "final"),
        ("b", "INV-2026-000002", "final"),
    ]
    assert {c: i["id"] for c, i in final.items()} == {c: i["id"] for c, i in first.items()}
    again = invoicing.bill_period(
        database_url, march, MARCH, finalize=True, now=AFTER_GRACE + timedelta(days=3)
    )
    assert (again.finalized, again.already_final, again.drafts) == (0, 2, 0)
    assert invoices(database_url) == final
    with db.connect(database_url) as conn, pytest.raises(psycopg.errors.RaiseException, match="final"):
        conn.execute("UPDATE invoice_lines SET amount = 0 WHERE invoice_id = %s", (final["a"]["id"],))


def test_a_late_event_after_finalization_is_one_adjustment_on_the_next_draft(
    march, nats_server, database_url
):
    invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    send(nats_server, database_url, march, [api_call("a-late", "a", ts=ts(30))])
    for _ in range(2):  # a rerun adds no second adjustment
        invoicing.bill_period(database_url, march, "2026-04", now=datetime(2026, 4, 20, tzinfo=UTC))
        april = invoices(database_url, "2026-04")["a"]
        adjustments = [line for line in april["lines"] if line["type"] == "adjustment"]
        # graduated: q 5 -> 6 prices 2.80 -> 2.90, so +0.10 (bytes: us-east-1 6144 -> 8192: +2.048 -> +2.05).
        assert [(x["meter"], x["amount"], x["quantity"], x["adjusts_period"]) for x in adjustments] == [
            ("api_calls", "0.10", "1", MARCH),
            ("bytes_transferred", "2.05", "2048", MARCH),
        ]
    assert invoices(database_url)["a"]["total"] == "20.94"  # March itself is untouched
    invoicing.bill_period(
        database_url, march, "2026-04", finalize=True, now=datetime(2026, 5, 1, 2, tzinfo=UTC)
    )
    invoicing.bill_period(database_url, march, "2026-05", now=datetime(2026, 5, 20, tzinfo=UTC))
    may = invoices(database_url, "2026-05")["a"]
    assert [line for line in may["lines"] if line["type"] == "adjustment"] == []


def test_late_usage_the_minimum_already_paid_for_costs_nothing_more(march, nats_server, database_url):
    invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    # b's basic part of March billed 6.34 of lines and a minimum line of 3.34 (9.677.. prorated minimum).
    # 10 late api calls: graduated q 1 -> 11 is 1.50 -> 3.40 (+1.90); the lines now come to 8.24, the
    # shortfall to 1.44 (9.677.. - 8.24), so the minimum line goes 3.34 -> 1.44 (-1.90): nothing to pay.
    send(
        nats_server,
        database_url,
        march,
        [api_call(f"b-late{i}", "b", ts=ts(5), bytes_transferred=0) for i in range(10)],
    )
    invoicing.bill_period(database_url, march, "2026-04", now=datetime(2026, 4, 20, tzinfo=UTC))
    lines = [x for x in invoices(database_url, "2026-04")["b"]["lines"] if x["type"] == "adjustment"]
    assert [(x["meter"], x["amount"]) for x in lines] == [("api_calls", "1.90"), (None, "-1.90")]
    # 40 more: q 51 is 2.50 + 49 x 0.10 = 7.40 (+5.90 on what was billed); 12.24 of lines exceed the
    # minimum, whose 3.34 is given back: +2.56 in all, the same as billing March again from scratch.
    send(
        nats_server,
        database_url,
        march,
        [api_call(f"b-late{i}", "b", ts=ts(6), bytes_transferred=0) for i in range(10, 50)],
    )
    invoicing.bill_period(database_url, march, "2026-04", now=datetime(2026, 4, 20, tzinfo=UTC))
    lines = [x for x in invoices(database_url, "2026-04")["b"]["lines"] if x["type"] == "adjustment"]
    assert [(x["meter"], x["amount"]) for x in lines] == [("api_calls", "5.90"), (None, "-3.34")]
    assert all(x["adjusts_period"] == MARCH and x["plan"] == "basic" for x in lines)


def test_two_billing_runs_of_one_period_cannot_both_write(march, database_url):
    with db.connect(database_url) as holder, holder.transaction():
        invoicing._lock(holder, MARCH)  # a run of March that is writing
        with pytest.raises(Conflict, match="another billing run"):
            invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
        assert invoices(database_url) == {}
        invoicing.bill_period(database_url, march, "2026-04", now=AFTER_GRACE)  # another period is free
    assert invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE).drafts == 2


def test_every_month_can_be_locked(clean, database_url):
    # The lock keys are int4: a hash slice above 2**31 once made October 2026 unbillable.
    with db.connect(database_url) as conn, conn.transaction():
        for year in (2025, 2026, 2027):
            for month in range(1, 13):
                invoicing._lock(conn, f"{year}-{month:02d}")


def test_customer_registry_rules(clean, database_url, billing_catalog):
    plans = billing_catalog.plans
    assert put(database_url, billing_catalog, "c", {"name": "C"}) is True
    assert put(database_url, billing_catalog, "c", {"email": "c@c.test"}) is False
    with db.connect(database_url) as conn:
        assert customers.customer_json(conn, "c") == {
            "id": "c",
            "name": "C",
            "email": "c@c.test",
            "subscriptions": [],
        }
        with pytest.raises(InvalidRequest, match="unknown plan 'gold'"):
            customers.subscribe(conn, "c", "gold", MAR_16, plans)
        with pytest.raises(NotFound):
            customers.subscribe(conn, "nobody", "basic", MAR_16, plans)
        customers.subscribe(conn, "c", "basic", MAR_16, plans)
        assert customers.subscribe(conn, "c", "basic", MAR_16 + timedelta(days=1), plans) is False
        with pytest.raises(InvalidRequest, match="after the running subscription"):
            customers.subscribe(conn, "c", "pro", MAR_16, plans)
        with pytest.raises(InvalidRequest, match="share a currency"):
            customers.subscribe(conn, "c", "yen", MAR_16 + timedelta(days=2), plans)
        customers.subscribe(conn, "c", "pro", MAR_16 + timedelta(days=2), plans)
        conn.commit()
        assert customers.customer_json(conn, "c")["subscriptions"] == [
            {
                "plan": "basic",
                "starts_at": "2026-03-16T00:00:00.000000Z",
                "ends_at": "2026-03-18T00:00:00.000000Z",
            },
            {"plan": "pro", "starts_at": "2026-03-18T00:00:00.000000Z", "ends_at": None},
        ]
        with pytest.raises(InvalidRequest, match="unknown field"):
            customers.put_customer(conn, "c", {"plan": "basic", "colour": "red"}, plans)


def test_a_plan_change_into_a_final_period_is_refused(march, database_url):
    invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    with db.connect(database_url) as conn, pytest.raises(Conflict, match="final"):
        customers.subscribe(conn, "a", "pro", datetime(2026, 3, 20, tzinfo=UTC), march.plans)
