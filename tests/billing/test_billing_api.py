"""The billing routes of the real gateway: customers, plan changes, invoices as JSON, CSV and HTML."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from ingest_gateway.app import create_app
from meter_platform.billing import invoicing
from tests.billing.support import AFTER_GRACE, MARCH
from tests.helpers import AUTH

LINE_KEYS = {
    "type", "plan", "meter", "group", "description", "quantity", "amount", "precise_amount",
    "service_period_start", "service_period_end", "tiers", "adjusts_period", "events",
}  # fmt: skip


@pytest.fixture
def client(march, settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, march), headers=AUTH) as c:
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "details"} and body["error"]
    return body


def test_customers_are_created_updated_and_change_plan(client):
    created = client.put("/v1/customers/cust-1", json={"name": "One", "email": "one@x.test", "plan": "basic",
                                                        "subscribed_from": "2026-05-01T00:00:00Z"})  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.json() == {
        "id": "cust-1",
        "name": "One",
        "email": "one@x.test",
        "subscriptions": [{"plan": "basic", "starts_at": "2026-05-01T00:00:00.000000Z", "ends_at": None}],
    }
    assert client.put("/v1/customers/cust-1", json={"name": "Uno"}).status_code == 200
    changed = client.post(
        "/v1/customers/cust-1/subscriptions", json={"plan": "pro", "starts_at": "2026-05-10T12:00:00+02:00"}
    )
    assert changed.status_code == 201, changed.text
    assert changed.json()["subscriptions"] == [
        {
            "plan": "basic",
            "starts_at": "2026-05-01T00:00:00.000000Z",
            "ends_at": "2026-05-10T10:00:00.000000Z",
        },
        {"plan": "pro", "starts_at": "2026-05-10T10:00:00.000000Z", "ends_at": None},
    ]
    assert client.get("/v1/customers/cust-1").json()["name"] == "Uno"
    listed = client.get("/v1/customers").json()["customers"]
    assert [c["id"] for c in listed] == ["a", "b", "cust-1"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("put", "/v1/customers/x", {"plan": "gold"}, 400),
        ("put", "/v1/customers/x", {"colour": "red"}, 400),
        ("put", "/v1/customers/x", {"plan": "basic", "subscribed_from": "yesterday"}, 400),
        ("put", "/v1/customers/x", [1, 2], 400),
        ("post", "/v1/customers/nobody/subscriptions", {"plan": "basic"}, 404),
        ("post", "/v1/customers/a/subscriptions", {"plan": "yen"}, 400),
        ("post", "/v1/customers/a/subscriptions", {"starts_at": "2026-05-01T00:00:00Z"}, 400),
        ("get", "/v1/customers/nobody", None, 404),
        ("get", "/v1/invoices?period=2026-3", None, 400),
        ("get", "/v1/invoices?status=paid", None, 400),
        ("get", "/v1/invoices/inv_nope", None, 404),
        ("get", "/v1/invoices/inv_nope.html", None, 404),
    ],
)
def test_bad_billing_requests_get_a_clear_4xx(client, method, path, body, status):
    response = getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)
    error_of(response, status)


def test_invoices_as_json_csv_and_html(client, database_url, march):
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    answer = client.get("/v1/invoices", params={"period": MARCH}).json()["invoices"]
    assert [(i["customer_id"], i["status"], i["total"], i["number"]) for i in answer] == [
        ("a", "draft", "20.94", None),
        ("b", "draft", "31.68", None),
    ]
    b = answer[1]
    assert set(b) == {"id", "number", "customer_id", "period", "period_start", "period_end", "status",
                      "currency", "lines", "subtotal", "total"}  # fmt: skip
    assert all(set(line) == LINE_KEYS for line in b["lines"])
    assert (b["period_start"], b["period_end"]) == (
        "2026-03-01T00:00:00.000000Z",
        "2026-04-01T00:00:00.000000Z",
    )
    assert client.get(f"/v1/invoices/{b['id']}").json() == b
    assert client.get("/v1/invoices", params={"customer_id": "a", "status": "final"}).json() == {
        "invoices": []
    }

    page = client.get(f"/v1/invoices/{b['id']}.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "DRAFT" in page.text and "Bolt" in page.text and "31.68" in page.text and "minimum" in page.text

    sheet = client.get("/v1/invoices.csv", params={"period": MARCH})
    assert sheet.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(sheet.text)))
    assert len(rows) == len(answer[0]["lines"]) + len(b["lines"])
    assert sum(float(r["amount"]) for r in rows if r["customer_id"] == "b") == pytest.approx(31.68)

    invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    final = client.get(f"/v1/invoices/{b['id']}.html").text
    assert "INV-2026-000002" in final and "DRAFT" not in final
    error_of(
        client.post(
            "/v1/customers/b/subscriptions", json={"plan": "basic", "starts_at": "2026-03-25T00:00:00Z"}
        ),
        409,
    )
