"""The billing job (one run per month partition) and the schedule that keeps invoices current."""

from datetime import UTC, datetime, timedelta

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from meter_platform.billing.invoicing import period_is_final
from meter_platform.billing.periods import period_bounds, period_key
from meter_platform.config import load_billing_settings
from meter_platform.defs.resources import PostgresResource
from meter_platform.storage import db

billing_job = define_asset_job(
    "billing_job",
    selection=AssetSelection.assets("invoice_lines", "invoices"),
    description="Rebuild one month's draft invoices; with finalize: true, number and finalize them.",
)


def previous_period(period: str) -> str:
    """The month before ``period``."""
    start, _ = period_bounds(period)
    return period_key(start - timedelta(microseconds=1))


@schedule(
    job=billing_job,
    cron_schedule="7 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Hourly: refreshes the running month's drafts once a day (at 00:07 UTC) and finalizes "
    "the previous month once its grace period (METER_BILLING_GRACE) has passed.",
)
def billing_schedule(context: ScheduleEvaluationContext, postgres: PostgresResource):
    """Which months need a billing run now."""
    now = context.scheduled_execution_time or datetime.now(UTC)
    running = period_key(now)
    requests = []
    if now.hour == 0:
        requests.append(RunRequest(run_key=f"refresh-{running}-{now:%Y-%m-%d}", partition_key=running))
    previous = previous_period(running)
    _, end = period_bounds(previous)
    if now >= end + load_billing_settings().grace:
        with db.connect(postgres.url) as conn:
            pending = conn.execute(
                "SELECT count(*) FROM invoices WHERE period = %s AND status = 'draft'", (previous,)
            ).fetchone()
            due = bool(pending and pending[0]) and not period_is_final(conn, previous)
        if due:
            # A finalization that is refused (a blocking check failing) is tried again next hour.
            requests.append(
                RunRequest(
                    run_key=f"finalize-{previous}-{now:%Y-%m-%dT%H}",
                    partition_key=previous,
                    run_config={"ops": {"billing_period": {"config": {"finalize": True}}}},
                )
            )
    return requests or SkipReason(f"nothing to bill at {now:%Y-%m-%d %H:%M} UTC")
