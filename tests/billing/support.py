"""Shared pieces of the billing tests that run against the real servers: a small catalog of plans,
March 2026 usage for two customers, and readers of the stored invoices."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meter_platform.billing import customers, statements
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.storage import db
from tests.helpers import api_call, publish, run_drain

MARCH = "2026-03"
MAR_16 = datetime(2026, 3, 16, tzinfo=UTC)
AFTER_GRACE = datetime(2026, 4, 1, 2, tzinfo=UTC)


@pytest.fixture
def billing_catalog(tmp_path: Path) -> Catalog:
    """The example events and meters with the small plans of tests/catalogs/billing."""
    for name in ("events.yaml", "meters.yaml"):
        shutil.copy(EXAMPLE_CATALOG_DIR / name, tmp_path / name)
    shutil.copy(Path(__file__).parent.parent / "catalogs" / "billing" / "plans.yaml", tmp_path / "plans.yaml")
    return load_catalog(tmp_path)


@pytest.fixture
def old_events_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Events from March 2026 are older than the default lateness limit: allow them."""
    monkeypatch.setenv("METER_MAX_LATENESS_DAYS", "3650")


def ts(day: int, hour: int = 12) -> str:
    return f"2026-03-{day:02d}T{hour:02d}:00:00.000000Z"


def send(nats_server, database_url, catalog, events: list[dict[str, Any]]) -> None:
    publish(nats_server.url, events)
    run_drain(nats_server.url, database_url, catalog)


def put(database_url: str, catalog: Catalog, customer_id: str, body: dict[str, Any]) -> bool:
    with db.connect(database_url) as conn:
        created = customers.put_customer(conn, customer_id, body, catalog.plans)
        conn.commit()
    return created


def invoices(database_url: str, period: str = MARCH) -> dict[str, dict[str, Any]]:
    with db.connect(database_url) as conn:
        return {i["customer_id"]: i for i in statements.invoices_json(conn, period=period)}


def amounts(invoice: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(line["type"], line["meter"], line["amount"]) for line in invoice["lines"]]


@pytest.fixture
def march(clean, nats_server, database_url, billing_catalog, old_events_allowed) -> Catalog:
    """Customer a on basic all March; b on basic, then pro from March 16 00:00; their March usage."""
    put(database_url, billing_catalog, "a", {"name": "Acme", "email": "ap@acme.test", "plan": "basic",
                                             "subscribed_from": "2026-03-01T00:00:00Z"})  # fmt: skip
    put(
        database_url,
        billing_catalog,
        "b",
        {"name": "Bolt", "plan": "basic", "subscribed_from": "2026-03-01T00:00:00Z"},
    )
    with db.connect(database_url) as conn:
        customers.subscribe(conn, "b", "pro", MAR_16, billing_catalog.plans)
        conn.commit()
    events = [api_call(f"a{i}", "a", ts=ts(2 + i), bytes_transferred=2048) for i in range(3)]
    events += [
        api_call(f"a{i}", "a", ts=ts(10 + i), region="eu-west-1", bytes_transferred=1000) for i in (3, 4)
    ]
    events.append(api_call("b-basic", "b", ts=ts(10), bytes_transferred=0))
    events += [api_call(f"b-pro{i}", "b", ts=ts(20 + i)) for i in range(4)]
    events.append(api_call("a-april", "a", ts="2026-04-02T00:00:00.000000Z"))  # not March
    send(nats_server, database_url, billing_catalog, events)
    return billing_catalog
