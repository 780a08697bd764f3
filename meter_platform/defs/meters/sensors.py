"""The sensor that notices a changed catalog and launches a replay of the meters it changed."""

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from meter_platform.catalog import CatalogError
from meter_platform.defs.ingestion.sensors import ACTIVE_RUN_STATUSES
from meter_platform.defs.meters.jobs import meter_replay_job
from meter_platform.defs.resources import CatalogResource, PostgresResource
from meter_platform.meters.aggregates import pending_changes
from meter_platform.storage import db


@sensor(
    job=meter_replay_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launches meter_replay_job when meters.yaml adds, changes or removes a meter.",
)
def meter_catalog_sensor(
    context: SensorEvaluationContext, postgres: PostgresResource, catalog: CatalogResource
):
    """Compare the catalog's meters with the active definitions."""
    try:
        wanted = catalog.load()
    except CatalogError as exc:
        return SkipReason(f"the catalog has errors; fix them to replay: {exc}")
    with db.connect(postgres.url) as conn:
        changes = pending_changes(wanted, conn)
    if not changes:
        return SkipReason("every meter is active as the catalog defines it")
    if context.instance.get_runs_count(
        RunsFilter(job_name=meter_replay_job.name, statuses=ACTIVE_RUN_STATUSES)
    ):
        return SkipReason(f"{len(changes)} meter change(s) pending; a replay is already running")
    slugs = [c.slug for c in changes]
    return RunRequest(
        run_config={"ops": {"replay_meters": {"config": {"slugs": slugs}}}},
        tags={"meter/replay": ",".join(slugs)[:200]},
    )
