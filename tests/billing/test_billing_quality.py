"""Billing's guards against the real PostgreSQL: usage nobody is subscribed for, the customer registry
in the known-customers check, and usage thresholds that alert exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meter_platform import alerts, quality
from meter_platform.billing import invoicing
from meter_platform.billing.thresholds import crossed_thresholds
from meter_platform.config import QualitySettings
from meter_platform.storage import db
from tests.billing.support import put, send
from tests.helpers import RECENT_TS, api_call

SETTINGS = QualitySettings()


def test_usage_without_a_subscription_is_reported_not_billed_silently(
    clean, nats_server, database_url, billing_catalog
):
    send(nats_server, database_url, billing_catalog, [api_call("u1", "paying"), api_call("u2", "stranger")])
    with db.connect(database_url) as conn:
        outcome = quality.usage_without_subscription(conn, SETTINGS)
        assert outcome.passed and outcome.metadata == {"billing": False}  # no subscriptions: billing unused
    put(database_url, billing_catalog, "paying", {"plan": "basic", "subscribed_from": "2026-01-01T00:00:00Z"})
    with db.connect(database_url) as conn:
        outcome = quality.usage_without_subscription(conn, SETTINGS)
    assert not outcome.passed
    assert [u["customer_id"] for u in outcome.metadata["uncovered"]] == ["stranger"]
    assert "subscribe them" in outcome.description


def test_registered_customers_are_the_known_customers(clean, nats_server, database_url, billing_catalog):
    send(nats_server, database_url, billing_catalog, [api_call("k1", "acme"), api_call("k2", "zeta")])
    put(database_url, billing_catalog, "acme", {"name": "ACME"})
    outcomes = quality.expectation_checks(database_url, billing_catalog, SETTINGS)
    known = next(o for o in outcomes if o.check_name == "every_customer_known")
    assert not known.passed and known.metadata["sample"] == ["zeta"]
    put(database_url, billing_catalog, "zeta", {})
    outcomes = quality.expectation_checks(database_url, billing_catalog, SETTINGS)
    assert next(o for o in outcomes if o.check_name == "every_customer_known").passed


def test_a_crossed_threshold_alerts_once_per_period(
    clean, nats_server, database_url, billing_catalog, old_events_allowed
):
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE alert_deliveries, alert_episodes")
    now = datetime.now(UTC)
    period = f"{now:%Y-%m}"
    put(database_url, billing_catalog, "t", {"plan": "basic", "subscribed_from": f"{period}-01T00:00:00Z"})
    # basic alerts at 4 api_calls, and at an amount of 25.00 (not reached: 10.00 base + 2.80).
    recent = (
        RECENT_TS if RECENT_TS.startswith(period) else f"{now - timedelta(seconds=5):%Y-%m-%dT%H:%M:%S.%fZ}"
    )
    send(nats_server, database_url, billing_catalog, [api_call(f"t{i}", "t", ts=recent) for i in range(5)])
    channels = [alerts.AlertChannel(name="log", type="log")]
    for _ in range(3):  # a rerun, and another, raise nothing new
        invoicing.bill_period(database_url, billing_catalog, period)
        with db.connect(database_url) as conn:
            crossed = crossed_thresholds(conn, billing_catalog, period)
            assert [o.check_name for o in crossed] == [f"usage_threshold:t:{period}:basic:0"]
            alerts.evaluate(conn, crossed, channels)
            conn.commit()
    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT e.check_name, d.kind FROM alert_episodes e JOIN alert_deliveries d USING (episode_id)"
        ).fetchall()
    assert rows == [(f"usage_threshold:t:{period}:basic:0", "alert")]
