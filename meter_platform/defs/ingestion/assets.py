"""The ingestion assets: one run drains JetStream into raw events, quarantine and per-minute
aggregates (see ``meter_platform.ingestion.writer`` for the ordering that makes it exactly-once)."""

import asyncio
import time
from typing import Any

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
    multi_asset,
)

from meter_platform.config import DrainSettings
from meter_platform.defs.ingestion.liveness import RunWatch
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
from meter_platform.ingestion.counts import BatchCounts
from meter_platform.ingestion.drain import drain
from meter_platform.storage import db

JETSTREAM_EVENTS = AssetSpec(
    "jetstream_events",
    description="Events accepted by the gateway or published to NATS, durable in the METER_EVENTS stream "
    "until the pipeline commits them.",
    group_name="ingestion",
    kinds={"nats"},
)


class DrainConfig(Config):
    """How long one run drains, and in what batch size (defaults: :class:`DrainSettings`); which
    partition's consumer it drains (METER_PARTITIONS > 1; the sensor sets it, with the run's tag
    ``meter/partition``)."""

    max_seconds: float = DrainSettings.max_seconds
    idle_seconds: float = DrainSettings.idle_seconds
    batch_size: int = DrainSettings.batch_size
    partition: int = 0


@multi_asset(
    specs=[
        AssetSpec(
            "usage_events",
            deps=[JETSTREAM_EVENTS],
            group_name="ingestion",
            kinds={"postgres"},
            description="Raw usage events, one row per event id (deduplicated), as validated.",
        ),
        AssetSpec(
            "quarantined_events",
            deps=[JETSTREAM_EVENTS],
            group_name="ingestion",
            kinds={"postgres"},
            description="Events that failed validation, with their reasons; never dropped.",
        ),
        AssetSpec(
            "usage_minute_aggregates",
            deps=["usage_events"],
            group_name="ingestion",
            kinds={"postgres"},
            description="Per meter, customer, dimensions and minute: count, sum, min, max of newly "
            "stored events.",
        ),
    ],
    check_specs=[
        AssetCheckSpec(
            "ingest_ledger_balances",
            asset="usage_events",
            description="Every event this run took from JetStream is stored, a duplicate or "
            "quarantined, and the ledger holds every message it committed.",
        ),
    ],
    can_subset=False,
)
def ingest_microbatches(
    context: AssetExecutionContext,
    config: DrainConfig,
    nats: NatsResource,
    postgres: PostgresResource,
    catalog: CatalogResource,
):
    """Drain the durable consumer in micro-batches until idle or out of time."""
    last_log = [time.monotonic()]
    seen = BatchCounts()

    def progress(counts: BatchCounts) -> None:
        seen.add(counts)
        if time.monotonic() - last_log[0] >= 5:
            last_log[0] = time.monotonic()
            context.log.info(
                f"{seen.batches} batches, {seen.events} events: {seen.stored} stored, "
                f"{seen.duplicates} duplicates, {seen.quarantined} quarantined"
            )

    settings = DrainSettings(
        batch_size=config.batch_size, max_seconds=config.max_seconds, idle_seconds=config.idle_seconds
    )
    # Stop when the run worker dies or the run is failed/canceled; prove to the sensor we are alive.
    watch = RunWatch(context.instance, context.run.run_id)
    total = asyncio.run(
        drain(
            nats.url,
            postgres.url,
            catalog.load(),
            settings,
            run_id=context.run.run_id,
            on_batch=progress,
            should_stop=watch.should_stop,
            heartbeat=watch.heartbeat,
            partition=config.partition,
        )
    )
    if watch.gone:
        context.log.warning(f"stopped draining early: {watch.gone}; un-acked messages are redelivered")
    context.log.info(
        f"drained {total.messages} messages ({total.events} events) in {total.batches} batches: "
        f"{total.stored} stored, {total.duplicates} duplicates, {total.quarantined} quarantined, "
        f"{total.redelivered} redelivered messages skipped"
    )
    yield from _results(total, _ledger_messages(postgres.url, context.run.run_id))


def _ledger_messages(database_url: str, run_id: str) -> int:
    """Messages the ledger holds for the run's batches."""
    with db.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM ingest_messages m JOIN ingest_batches b USING (batch_id) WHERE b.run_id = %s",
            (run_id,),
        ).fetchone()
    return row[0] if row else 0


def _results(total: BatchCounts, ledger_messages: int):
    """The run's materializations of the three ingestion assets, with its ledger check."""
    seq_range = f"{total.first_seq}-{total.last_seq}" if total.first_seq is not None else "none"
    common: dict[str, Any] = {
        "stream_seq_range": seq_range,
        "batches": total.batches,
        "messages": total.messages,
    }
    yield MaterializeResult(
        asset_key=AssetKey("usage_events"),
        metadata={
            **common,
            "events": total.events,
            "stored": total.stored,
            "duplicates": total.duplicates,
            "redelivered_messages": total.redelivered,
        },
        check_results=[
            AssetCheckResult(
                check_name="ingest_ledger_balances",
                passed=total.balanced and ledger_messages == total.messages,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "events": total.events,
                    "accounted": total.stored + total.duplicates + total.quarantined,
                    "messages": total.messages,
                    "ledger_messages": ledger_messages,
                },
            )
        ],
    )
    yield MaterializeResult(
        asset_key=AssetKey("quarantined_events"), metadata={**common, "quarantined": total.quarantined}
    )
    yield MaterializeResult(
        asset_key=AssetKey("usage_minute_aggregates"),
        metadata={**common, "events_aggregated": MetadataValue.int(total.stored)},
    )
