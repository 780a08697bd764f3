"""The data-quality checks of the usage assets, run together on a schedule.

One op evaluates every check (plain SQL first, then great-expectations), records each outcome in
``quality_check_results`` (which the alert sensor reads), reports it as an asset check result (the
check history on each asset in the UI) and materializes ``data_quality_summary``.
"""

import asyncio
from datetime import datetime
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    AssetSpec,
    DefaultScheduleStatus,
    MetadataValue,
    ScheduleDefinition,
    define_asset_job,
    multi_asset_check,
)

from meter_platform import quality
from meter_platform.capture import jetstream
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
from meter_platform.ingestion.ledger import LEDGER_TOTALS_SQL, LedgerTotals
from meter_platform.meters.aggregates import active_meters
from meter_platform.storage import db

DATA_QUALITY_SUMMARY = AssetSpec(
    "data_quality_summary",
    deps=["usage_events", "quarantined_events", "usage_minute_aggregates"],
    group_name="quality",
    description="The latest outcome of every data-quality check, the ledger totals, and whether invoices "
    "may be finalized (no failing ERROR check on reconciliation or ledger continuity).",
)


def _metadata(values: dict[str, Any]) -> dict[str, Any]:
    return {k: MetadataValue.json(v) if isinstance(v, dict | list) else v for k, v in values.items()}


def evaluate_all(
    database_url: str, nats: NatsResource, catalog_resource: CatalogResource
) -> list[quality.CheckOutcome]:
    """Every check, in a fixed order; reconciliation reads one consistent snapshot."""
    settings = quality.QualitySettings.from_env()
    catalog = catalog_resource.load()
    backlog = nats.backlog()
    if backlog.stream_created is None:
        raise RuntimeError("JetStream did not report when the events stream was created")
    with db.connect(database_url) as conn:
        conn.read_only = True
        conn.isolation_level = db.psycopg.IsolationLevel.REPEATABLE_READ
        meters = active_meters(conn)
        outcomes = [
            quality.reconcile_aggregates(conn, meters, settings),
            quality.ledger_continuity(conn, backlog.ack_floor, backlog.stream_created),
            quality.freshness(conn, meters, settings),
            quality.volume_anomaly(conn, meters, settings),
            *quality.ingest_rates(conn, settings),
            quality.usage_without_subscription(conn, settings),
        ]
    outcomes += quality.expectation_checks(database_url, catalog, settings)
    outcomes.append(quality.backlog_age(asyncio.run(_oldest_pending(nats.url)), backlog.messages, settings))
    return outcomes


async def _oldest_pending(url: str) -> datetime | None:
    nc = await jetstream.connect(url, name="meter-quality", max_reconnect_attempts=0)
    try:
        return await jetstream.oldest_pending(nc.jetstream())
    finally:
        await nc.close()


@multi_asset_check(
    specs=[
        AssetCheckSpec(spec.name, asset=spec.asset, description=f"{spec.severity}: {spec.description}")
        for spec in quality.CHECKS.values()
    ],
    description="Evaluate every data-quality check and record the outcomes.",
)
def data_quality_checks(
    context: AssetCheckExecutionContext,
    postgres: PostgresResource,
    nats: NatsResource,
    catalog: CatalogResource,
):
    """Run the checks, record them, report them, and materialize the summary."""
    outcomes = evaluate_all(postgres.url, nats, catalog)
    with db.connect(postgres.url) as conn:
        for outcome in outcomes:
            quality.record(conn, outcome, context.run.run_id)
        conn.commit()
        blocking = quality.blocking_failures(conn)
        row = conn.execute(LEDGER_TOTALS_SQL).fetchone()
        totals = LedgerTotals.from_row(row)
    for outcome in outcomes:
        yield AssetCheckResult(
            asset_key=AssetKey(outcome.asset),
            check_name=outcome.check_name,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR if outcome.severity == "ERROR" else AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata=_metadata(outcome.metadata),
        )
    failing = [o for o in outcomes if not o.passed]
    table = ["| check | asset | severity | passed | finding |", "| --- | --- | --- | --- | --- |"] + [
        f"| {o.check_name} | {o.asset} | {o.severity} | {'yes' if o.passed else 'NO'} | {o.description} |"
        for o in outcomes
    ]
    context.op_execution_context.log_event(
        AssetMaterialization(
            asset_key=DATA_QUALITY_SUMMARY.key,
            description=f"{len(failing)} of {len(outcomes)} checks failing; "
            + ("invoices may be finalized" if not blocking else "invoice finalization is BLOCKED"),
            metadata={
                "checks": MetadataValue.md("\n".join(table)),
                "failing": len(failing),
                "blocking_failures": [o.check_name for o in blocking],
                "invoices_may_be_finalized": not blocking,
                "events_processed": totals.processed,
                "stored": totals.stored,
                "duplicates": totals.duplicates,
                "quarantined": totals.quarantined,
                "replayed_from_quarantine": totals.replayed,
                "quarantine_rate": round(totals.quarantined / totals.processed, 4)
                if totals.processed
                else 0.0,
            },
        )
    )


data_quality_job = define_asset_job(
    "data_quality_job",
    selection=AssetSelection.checks(data_quality_checks),
    description="Evaluate every data-quality check of the usage assets.",
)

data_quality_schedule = ScheduleDefinition(
    job=data_quality_job,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Data-quality checks every five minutes.",
)
