"""The micro-batch job: runs of the ingestion assets, limited in number by the run queue."""

from dagster import AssetSelection, define_asset_job

#: dagster_home/dagster.yaml limits how many runs carrying this tag run at once.
INGEST_TAG = {"meter/pipeline": "ingest"}

ingest_microbatch_job = define_asset_job(
    "ingest_microbatch_job",
    selection=AssetSelection.assets("usage_events", "quarantined_events", "usage_minute_aggregates"),
    # Run monitoring cancels a run still going after this (one drains for 5 minutes, then stops).
    tags={**INGEST_TAG, "dagster/max_runtime": "900"},
    description="Drain JetStream in micro-batches into raw events, quarantine and per-minute aggregates.",
)
