"""The micro-batch job: runs of the ingestion assets, limited in number by the run queue."""

from dagster import AssetCheckKey, AssetKey, AssetSelection, define_asset_job

#: dagster_home/dagster.yaml limits how many runs carrying this tag run at once.
INGEST_TAG = {"meter/pipeline": "ingest"}
INGEST_ASSETS = ("usage_events", "quarantined_events", "usage_minute_aggregates")

ingest_microbatch_job = define_asset_job(
    "ingest_microbatch_job",
    # The ingestion assets and the check they report themselves; not the data-quality checks that also
    # target them (data_quality_job runs those on its schedule, never inside a micro-batch run).
    selection=AssetSelection.assets(*INGEST_ASSETS).without_checks()
    | AssetSelection.checks(AssetCheckKey(AssetKey("usage_events"), "ingest_ledger_balances")),
    # Run monitoring cancels a run still going after this (one drains for 5 minutes, then stops).
    tags={**INGEST_TAG, "dagster/max_runtime": "900"},
    description="Drain JetStream in micro-batches into raw events, quarantine and per-minute aggregates.",
)
