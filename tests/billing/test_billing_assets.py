"""Billing through Dagster: the monthly partition materializes invoices with passing checks, a rerun
changes nothing, finalizing numbers them, and the schedule asks for the right months."""

from __future__ import annotations

from datetime import UTC, datetime

from dagster import DagsterInstance, build_schedule_context

from meter_platform.defs.billing.assets import billing_period
from meter_platform.defs.billing.jobs import billing_job, billing_schedule, previous_period
from meter_platform.defs.resources import CatalogResource, PostgresResource
from tests.billing.support import MARCH, invoices


def run_billing(database_url: str, catalog_dir: str, period: str, finalize: bool = False):
    job = billing_job.resolve(
        asset_graph=__import__("dagster")
        .Definitions(
            assets=[billing_period],
            resources={
                "postgres": PostgresResource(url=database_url),
                "catalog": CatalogResource(catalog_dir=catalog_dir),
            },
        )
        .get_repository_def()
        .asset_graph
    )
    return job.execute_in_process(
        partition_key=period,
        run_config={"ops": {"billing_period": {"config": {"finalize": finalize}}}},
        resources={
            "postgres": PostgresResource(url=database_url),
            "catalog": CatalogResource(catalog_dir=catalog_dir),
        },
        raise_on_error=False,
    )


def check_results(result) -> dict[str, bool]:
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}  # fmt: skip


def test_a_month_partition_materializes_checked_invoices_and_finalizes_once(march, database_url, monkeypatch):
    monkeypatch.setenv("METER_BILLING_GRACE", "PT1H")
    directory = str(march.directory)
    result = run_billing(database_url, directory, MARCH)
    assert result.success
    assert check_results(result) == {
        "invoice_totals_equal_their_lines": True,
        "one_invoice_per_subscribed_customer": True,
        "finalized_only_with_quality_passing": True,
    }
    drafts = invoices(database_url)
    assert {c: i["total"] for c, i in drafts.items()} == {"a": "20.94", "b": "31.68"}
    assert run_billing(database_url, directory, MARCH).success
    assert invoices(database_url) == drafts
    assert run_billing(database_url, directory, MARCH, finalize=True).success
    numbers = sorted(i["number"] for i in invoices(database_url).values())
    assert numbers[0].startswith("INV-") and len(set(numbers)) == 2
    # The running month cannot be finalized yet: the run fails and says why.
    running = f"{datetime.now(UTC):%Y-%m}"
    failed = run_billing(database_url, directory, running, finalize=True)
    assert not failed.success
    assert "cannot be finalized before" in str(failed.all_events)


def test_schedule_refreshes_daily_and_finalizes_the_closed_month_after_grace(
    march, database_url, monkeypatch
):
    monkeypatch.setenv("METER_BILLING_GRACE", "PT1H")
    resources = {"postgres": PostgresResource(url=database_url)}
    run_billing(database_url, str(march.directory), MARCH)  # March drafts exist

    def requests_at(when: datetime):
        context = build_schedule_context(
            instance=DagsterInstance.ephemeral(), scheduled_execution_time=when, resources=resources
        )
        result = billing_schedule(context)
        return [] if not isinstance(result, list) else [(r.partition_key, r.run_config != {}) for r in result]

    assert requests_at(datetime(2026, 4, 1, 0, 7, tzinfo=UTC)) == [("2026-04", False)]  # grace not over
    assert requests_at(datetime(2026, 4, 1, 1, 7, tzinfo=UTC)) == [("2026-03", True)]
    assert requests_at(datetime(2026, 4, 2, 0, 7, tzinfo=UTC)) == [("2026-04", False), ("2026-03", True)]
    run_billing(database_url, str(march.directory), MARCH, finalize=True)
    assert requests_at(datetime(2026, 4, 2, 1, 7, tzinfo=UTC)) == []
    assert previous_period("2026-01") == "2025-12"
