"""The Dagster code location: gathers the domain modules and wires resources in one place."""

from dagster import Definitions, EnvVar

from meter_platform.defs.ingestion.assets import JETSTREAM_EVENTS, ingest_microbatches
from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.ingestion.sensors import jetstream_backlog_sensor
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
from meter_platform.defs.usage.jobs import meter_replay_job
from meter_platform.defs.usage.sensors import meter_catalog_sensor

defs = Definitions(
    assets=[JETSTREAM_EVENTS, ingest_microbatches],
    jobs=[ingest_microbatch_job, meter_replay_job],
    sensors=[jetstream_backlog_sensor, meter_catalog_sensor],
    resources={
        "nats": NatsResource(url=EnvVar("METER_NATS_URL")),
        "postgres": PostgresResource(url=EnvVar("METER_DATABASE_URL")),
        "catalog": CatalogResource(catalog_dir=EnvVar("METER_CATALOG_DIR")),
    },
)
