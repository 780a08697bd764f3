"""Billing as monthly-partitioned assets: usage -> invoice_lines -> invoices, one partition per
calendar month in UTC (key ``YYYY-MM``). A run of a partition rebuilds that month's draft invoices
(or, with ``finalize``, numbers them); see ``meter_platform.billing.invoicing`` for why a rerun or a
backfill from the UI never bills anything twice."""

from datetime import UTC, datetime

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    MonthlyPartitionsDefinition,
    multi_asset,
)

from meter_platform import alerts
from meter_platform.billing.checks import invoice_checks
from meter_platform.billing.invoicing import bill_period
from meter_platform.billing.thresholds import crossed_thresholds
from meter_platform.config import EXAMPLE_CATALOG_DIR, load_billing_settings
from meter_platform.defs.resources import CatalogResource, PostgresResource
from meter_platform.storage import db

#: Calendar months in UTC, keyed ``YYYY-MM``, up to and including the running month.
MONTHLY = MonthlyPartitionsDefinition(start_date="2025-01", fmt="%Y-%m", timezone="UTC", end_offset=1)

CHECK_NAMES = (
    "invoice_totals_equal_their_lines",
    "one_invoice_per_subscribed_customer",
    "finalized_only_with_quality_passing",
)


class BillingConfig(Config):
    """``finalize``: number and finalize the month's drafts (refused before the month's end plus
    ``METER_BILLING_GRACE``, or while ledger continuity or reconciliation fails)."""

    finalize: bool = False


@multi_asset(
    specs=[
        AssetSpec(
            "invoice_lines",
            deps=["usage_minute_aggregates", "usage_events"],
            group_name="billing",
            kinds={"postgres"},
            description="Each subscribed customer's invoice lines for the month: base fees, usage priced "
            "by the plan, minimum commitments, and adjustments for late usage of final months.",
        ),
        AssetSpec(
            "invoices",
            deps=["invoice_lines"],
            group_name="billing",
            kinds={"postgres"},
            description="One invoice per subscribed customer and month: draft until finalized, then "
            "numbered (INV-YYYY-NNNNNN) and never changed.",
        ),
    ],
    check_specs=[AssetCheckSpec(name, asset="invoices") for name in CHECK_NAMES],
    partitions_def=MONTHLY,
    can_subset=False,
)
def billing_period(
    context: AssetExecutionContext,
    config: BillingConfig,
    postgres: PostgresResource,
    catalog: CatalogResource,
):
    """Rebuild (and with ``finalize``, finalize) the partition's invoices, then check them."""
    period = context.partition_key
    loaded = catalog.load()
    report = bill_period(
        postgres.url, loaded, period, finalize=config.finalize, grace=load_billing_settings().grace
    )
    context.log.info(
        f"{period}: {report.drafts} drafts written, {report.finalized} finalized, "
        f"{report.already_final} already final, {report.removed} drafts removed"
    )
    channels = alerts.load_channels(alerts.alerts_path(catalog.catalog_dir or EXAMPLE_CATALOG_DIR))
    with db.connect(postgres.url) as conn:
        checks = invoice_checks(conn, period)
        if period >= f"{datetime.now(UTC):%Y-%m}":  # thresholds are about the running month
            alerts.evaluate(conn, crossed_thresholds(conn, loaded, period), channels)
        conn.commit()
    table = ["| customer | status | currency | total | number |", "| --- | --- | --- | --- | --- |"] + [
        f"| {c} | {s} | {cur} | {t} | {n or ''} |" for c, (s, cur, t, n) in report.totals.items()
    ]
    yield MaterializeResult(
        asset_key=AssetKey("invoice_lines"),
        metadata={"period": period, "invoices_rebuilt": report.drafts},
    )
    yield MaterializeResult(
        asset_key=AssetKey("invoices"),
        metadata={
            "period": period,
            "drafts_written": report.drafts,
            "finalized": report.finalized,
            "already_final": report.already_final,
            "invoices": MetadataValue.md("\n".join(table)),
        },
        check_results=[
            AssetCheckResult(
                asset_key=AssetKey("invoices"),
                check_name=c.name,
                passed=c.passed,
                severity=AssetCheckSeverity.ERROR,
                description=c.description,
                metadata={
                    k: MetadataValue.json(v) if isinstance(v, list | dict) else v
                    for k, v in c.metadata.items()
                },
            )
            for c in checks
        ],
    )
