"""The replay job: makes changed meter definitions active, rebuilding their aggregates from raw events."""

from dagster import AssetKey, AssetMaterialization, Config, MetadataValue, OpExecutionContext, job, op

from meter_platform.defs.resources import CatalogResource, PostgresResource
from meter_platform.meters.aggregates import requested_changes
from meter_platform.meters.rebuild import ReplayReport, format_report, replay_meter
from meter_platform.storage import db


class ReplayConfig(Config):
    """Which meters to replay; empty means every meter whose catalog definition is not active.

    ``rebuild: true`` also recomputes the named meters whose definition did not change (after the
    reconciliation check reported damaged windows, say).
    """

    slugs: list[str] = []  # noqa: RUF012 - a pydantic field: each config gets its own copy
    rebuild: bool = False


def _changes_table(report: ReplayReport, limit: int = 50) -> str:
    rows = ["| customer | old | new |", "| --- | --- | --- |"]
    for customer, (old, new) in list(report.changed_customers.items())[:limit]:
        rows.append(f"| {customer} | {old if old is not None else '-'} | {new if new is not None else '-'} |")
    return "\n".join(rows)


@op(description="Replay meters: delete and recompute their aggregates from raw events, report old vs new.")
def replay_meters(
    context: OpExecutionContext, config: ReplayConfig, postgres: PostgresResource, catalog: CatalogResource
) -> None:
    """Replay each requested (or pending) meter change in its own transaction."""
    with db.connect(postgres.url, autocommit=True) as conn:
        changes = requested_changes(catalog.load(), conn, config.slugs, rebuild=config.rebuild)
        if not changes:
            context.log.info("every meter is active as the catalog defines it; nothing to replay")
        for n, change in enumerate(changes, 1):
            context.log.info(f"replaying meter {n}/{len(changes)}: {change.slug} ({change.kind})")
            report = replay_meter(conn, change, progress=context.log.info)
            context.log.info(format_report(report))
            context.log_event(
                AssetMaterialization(
                    asset_key=AssetKey("usage_minute_aggregates"),
                    description=f"meter {change.slug} {change.kind}: aggregates rebuilt from raw events",
                    metadata={
                        "meter": change.slug,
                        "change": change.kind,
                        "events_reaggregated": report.events,
                        "customers": len(report.customers),
                        "customers_changed": len(report.changed_customers),
                        "old_vs_new": MetadataValue.md(_changes_table(report)),
                    },
                )
            )


@job(
    description="Make changed meter definitions active: rebuild their aggregates from the stored raw events."
)
def meter_replay_job():
    """One op: replay_meters."""
    replay_meters()
