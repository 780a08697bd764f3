"""Data-quality checks against real servers: each passes on sound data and fails on purpose-built
damage (a tampered aggregate, a message acked without being stored, out-of-range values, ...)."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime, timedelta

import pytest
from dagster import AssetCheckSeverity, DagsterInstance, Definitions

from meter_platform import quality
from meter_platform.capture import jetstream
from meter_platform.config import CONSUMER_NAME, EXAMPLE_CATALOG_DIR, STREAM_NAME
from meter_platform.defs.quality.checks import DATA_QUALITY_SUMMARY, data_quality_checks, data_quality_job
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
from meter_platform.meters.aggregates import active_meters
from meter_platform.storage import db
from tests.helpers import api_call, backlog, publish, run_drain

pytestmark = pytest.mark.usefixtures("clean")
SETTINGS = quality.QualitySettings()


def outcome_of(outcomes: list[quality.CheckOutcome], name: str) -> quality.CheckOutcome:
    return next(o for o in outcomes if o.check_name == name)


def ingest(nats_url: str, database_url: str, catalog, events) -> None:
    publish(nats_url, events)
    run_drain(nats_url, database_url, catalog)


def recent(minutes: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_reconciliation_passes_then_catches_a_tampered_aggregate(nats_server, database_url, catalog):
    ingest(
        nats_server.url,
        database_url,
        catalog,
        [api_call(f"r{i}", ts=recent(10 + i), bytes_transferred=100 + i) for i in range(5)],
    )
    with db.connect(database_url) as conn:
        meters = active_meters(conn)
        ok = quality.reconcile_aggregates(conn, meters, SETTINGS)
        assert ok.passed and ok.metadata["windows_compared"] > 0
        conn.execute(
            "UPDATE usage_minute_aggregates SET value_sum = value_sum + 1"
            " WHERE meter_slug = 'bytes_transferred' AND value_sum = 102"
        )
        bad = quality.reconcile_aggregates(conn, meters, SETTINGS)
    assert not bad.passed and bad.severity == "ERROR"
    assert bad.metadata["mismatches"] == 1
    assert bad.metadata["first_mismatches"][0]["raw_sum"] == "102"
    assert bad.metadata["first_mismatches"][0]["aggregate_sum"] == "103"


def test_reconciliation_catches_a_lost_aggregate_row(nats_server, database_url, catalog):
    ingest(nats_server.url, database_url, catalog, [api_call("x1", ts=recent(5))])
    with db.connect(database_url) as conn:
        conn.execute("DELETE FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'")
        outcome = quality.reconcile_aggregates(conn, active_meters(conn), SETTINGS)
    assert not outcome.passed and outcome.metadata["first_mismatches"][0]["aggregate_count"] is None


def test_ledger_continuity_catches_a_message_acked_without_being_stored(nats_server, database_url, catalog):
    ingest(nats_server.url, database_url, catalog, [api_call("c1")])
    with db.connect(database_url) as conn:
        state = backlog(nats_server.url)
        assert quality.ledger_continuity(conn, state.ack_floor, state.stream_created).passed

    publish(nats_server.url, [api_call("lost-1"), api_call("lost-2")])

    async def ack_without_storing() -> None:  # what a buggy consumer would do
        nc = await jetstream.connect(nats_server.url, name="tests")
        sub = await nc.jetstream().pull_subscribe_bind(CONSUMER_NAME, STREAM_NAME)
        for msg in await sub.fetch(1, timeout=5):
            await msg.ack_sync()
        await nc.close()

    asyncio.run(ack_without_storing())
    state = backlog(nats_server.url)
    assert state.ack_floor == 2
    with db.connect(database_url) as conn:
        outcome = quality.ledger_continuity(conn, state.ack_floor, state.stream_created)
    assert not outcome.passed and outcome.severity == "ERROR"
    assert outcome.metadata["missing_sequences"] == 1 and outcome.metadata["gaps"] == [[2, 2]]


def test_rates_freshness_and_volume(nats_server, database_url, catalog):
    events = [api_call("q1"), api_call("q1"), api_call("q2", method="NOPE"), api_call("q3", method="NOPE")]
    ingest(nats_server.url, database_url, catalog, events)
    with db.connect(database_url) as conn:
        rates = {o.check_name: o for o in quality.ingest_rates(conn, SETTINGS)}
        assert not rates["quarantine_rate"].passed and rates["quarantine_rate"].metadata["rate"] == 0.5
        assert not rates["duplicate_rate"].passed and rates["duplicate_rate"].metadata["rate"] == 0.25
        relaxed = quality.QualitySettings(max_quarantine_rate=0.5, max_duplicate_rate=0.3)
        assert all(o.passed for o in quality.ingest_rates(conn, relaxed))

        meters = active_meters(conn)
        assert quality.freshness(conn, meters, SETTINGS).passed
        later = datetime.now(UTC) + timedelta(hours=2)
        stale = quality.freshness(conn, meters, SETTINGS, now=later)
        assert not stale.passed and "api_calls" in stale.metadata["stale"]

        # Seven quiet days of ~100 calls, then 1000 in the last day.
        now = datetime.now(UTC)
        for day in range(1, 8):
            conn.execute(
                "INSERT INTO usage_minute_aggregates (meter_slug, minute, customer_id, dims, event_count, value_count)"
                " VALUES ('analytics_queries', date_trunc('minute', %s::timestamptz), 'c1', '{}', 100, 0)",
                (now - timedelta(days=day, hours=1),),
            )
        silent = quality.volume_anomaly(conn, meters, SETTINGS)
        assert not silent.passed  # a meter that fell silent is an anomaly too
        insert_today = (
            "INSERT INTO usage_minute_aggregates (meter_slug, minute, customer_id, dims, event_count, value_count)"
            " VALUES ('analytics_queries', date_trunc('minute', now() - interval '1 hour'), %s, '{}', %s, 0)"
        )
        conn.execute(insert_today, ("c1", 90))
        assert quality.volume_anomaly(conn, meters, SETTINGS).passed
        conn.execute(insert_today, ("c2", 910))
        loud = quality.volume_anomaly(conn, meters, SETTINGS)
    assert not loud.passed and loud.metadata["anomalies"]["analytics_queries"]["last_24h"] == 1000


def test_expectation_checks_pass_then_fail_on_damaged_data(nats_server, database_url, catalog, tmp_path):
    ingest(
        nats_server.url,
        database_url,
        catalog,
        [api_call("g1", customer="acme"), api_call("g2", customer="zeta")],
    )
    shutil.copytree(EXAMPLE_CATALOG_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "customers.yaml").write_text("customers:\n  - {id: acme, name: ACME}\n")
    with_registry = CatalogResource(catalog_dir=str(tmp_path)).load()

    outcomes = quality.expectation_checks(database_url, catalog, SETTINGS)
    assert all(o.passed for o in outcomes), [o.description for o in outcomes if not o.passed]
    assert outcome_of(outcomes, "every_customer_known").metadata == {"registry": False}

    with db.connect(database_url) as conn:
        conn.execute(
            "UPDATE usage_events SET properties = jsonb_set(properties, '{bytes_transferred}', '-5')"
            " WHERE id = 'g1'"
        )
        conn.execute(
            "UPDATE usage_minute_aggregates SET event_count = -1 WHERE meter_slug = 'api_calls'"
            " AND customer_id = 'zeta'"
        )
        conn.commit()
    outcomes = quality.expectation_checks(database_url, with_registry, SETTINGS)
    ranges = outcome_of(outcomes, "values_within_declared_ranges")
    assert not ranges.passed and "api_call.bytes_transferred" in ranges.metadata["out_of_range"]
    negatives = outcome_of(outcomes, "no_negative_quantities")
    assert not negatives.passed and negatives.metadata["negative"]["event_count"]["rows"] == 1
    customers = outcome_of(outcomes, "every_customer_known")
    assert not customers.passed and customers.metadata["sample"] == ["zeta"]


def test_data_quality_job_records_results_and_blocks_invoices_on_errors(nats_server, database_url, catalog):
    ingest(nats_server.url, database_url, catalog, [api_call(f"j{i}", ts=recent(3)) for i in range(3)])
    resources = {
        "postgres": PostgresResource(url=database_url),
        "nats": NatsResource(url=nats_server.url),
        "catalog": CatalogResource(catalog_dir=str(EXAMPLE_CATALOG_DIR)),
    }
    job = Definitions(
        asset_checks=[data_quality_checks],
        assets=[DATA_QUALITY_SUMMARY],
        jobs=[data_quality_job],
        resources=resources,
    ).resolve_job_def("data_quality_job")
    instance = DagsterInstance.ephemeral()

    result = job.execute_in_process(instance=instance)
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "aggregates_reconcile_with_raw_events",
        "no_negative_quantities",
        "volume_anomaly",
        "ledger_continuity",
        "values_within_declared_ranges",
        "freshness",
        "duplicate_rate",
        "every_customer_known",
        "quarantine_rate",
        "backlog_age",
        "usage_without_subscription",
    }
    assert all(e.passed for e in evaluations.values()), [n for n, e in evaluations.items() if not e.passed]
    [summary] = [
        m for m in result.get_asset_materialization_events() if m.asset_key == DATA_QUALITY_SUMMARY.key
    ]
    assert summary.materialization.metadata["invoices_may_be_finalized"].value is True

    with db.connect(database_url) as conn:
        conn.execute(
            "UPDATE usage_minute_aggregates SET event_count = event_count + 1 WHERE meter_slug = 'api_calls'"
        )
        conn.commit()
    result = job.execute_in_process(instance=instance)
    assert result.success  # a failing check is a finding, not a crashed run
    failed = {e.check_name: e for e in result.get_asset_check_evaluations() if not e.passed}
    assert set(failed) == {"aggregates_reconcile_with_raw_events"}
    assert failed["aggregates_reconcile_with_raw_events"].severity == AssetCheckSeverity.ERROR
    with db.connect(database_url) as conn:
        assert [o.check_name for o in quality.blocking_failures(conn)] == [
            "aggregates_reconcile_with_raw_events"
        ]
        recorded = conn.execute("SELECT count(*) FROM quality_check_results").fetchone()
    assert recorded == (2 * len(quality.CHECKS),)  # two runs, every check recorded once each
