"""The Dagster code location: gathers the domain modules and wires resources in one place."""

from dagster import Definitions, EnvVar

from meter_platform.defs.archive.assets import usage_events_archive
from meter_platform.defs.archive.jobs import archive_job, archive_schedule
from meter_platform.defs.billing.assets import billing_period
from meter_platform.defs.billing.jobs import billing_job, billing_schedule
from meter_platform.defs.ingestion.assets import JETSTREAM_EVENTS, ingest_microbatches
from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.ingestion.sensors import jetstream_backlog_sensor
from meter_platform.defs.meters.jobs import meter_replay_job
from meter_platform.defs.meters.sensors import meter_catalog_sensor
from meter_platform.defs.quality.checks import (
    DATA_QUALITY_SUMMARY,
    data_quality_checks,
    data_quality_job,
    data_quality_schedule,
)
from meter_platform.defs.quality.sensors import data_quality_alert_sensor
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource

defs = Definitions(
    assets=[
        JETSTREAM_EVENTS,
        ingest_microbatches,
        DATA_QUALITY_SUMMARY,
        billing_period,
        usage_events_archive,
    ],
    asset_checks=[data_quality_checks],
    jobs=[ingest_microbatch_job, meter_replay_job, data_quality_job, billing_job, archive_job],
    schedules=[data_quality_schedule, billing_schedule, archive_schedule],
    sensors=[jetstream_backlog_sensor, meter_catalog_sensor, data_quality_alert_sensor],
    resources={
        "nats": NatsResource(url=EnvVar("METER_NATS_URL")),
        "postgres": PostgresResource(url=EnvVar("METER_DATABASE_URL")),
        "catalog": CatalogResource(catalog_dir=EnvVar("METER_CATALOG_DIR")),
    },
)
