"""The archive job (one run per day partition) and the daily schedule that archives eligible days."""

from datetime import UTC, datetime

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from meter_platform.archive import eligible_days, load_archive_settings
from meter_platform.defs.archive.assets import DAILY
from meter_platform.defs.resources import PostgresResource
from meter_platform.storage import db

archive_job = define_asset_job(
    "usage_events_archive_job",
    selection=AssetSelection.assets("usage_events_archive"),
    description="Archive one day's raw events to Parquet (when older than METER_HOT_DAYS), then retention.",
)


@schedule(
    name="usage_events_archive_schedule",
    job=archive_job,
    cron_schedule="40 2 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily: one run per day that has a partition in PostgreSQL and is older than METER_HOT_DAYS.",
)
def archive_schedule(context: ScheduleEvaluationContext, postgres: PostgresResource):
    """The eligible days, oldest first (a day already archived has no partition, so is not asked again)."""
    now = context.scheduled_execution_time or datetime.now(UTC)
    settings = load_archive_settings()
    with db.connect(postgres.url) as conn:
        days = eligible_days(conn, settings, today=now.astimezone(UTC).date())
    first = DAILY.get_first_partition_key()
    requests = [
        RunRequest(run_key=f"archive-{d}-{now:%Y-%m-%d}", partition_key=d.isoformat())
        for d in days
        if first is not None and d.isoformat() >= first
    ]
    return requests or SkipReason(f"no day older than {settings.hot_days} days is still in PostgreSQL")
