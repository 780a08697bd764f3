"""The sensor that keeps the stream drained: a warm run always ready, more runs while events wait and
too few runs drain them (the decision: :func:`meter_platform.ingestion.runs.plan_runs`)."""

import time

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from meter_platform.config import IngestionSettings, load_ingestion_settings
from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.ingestion.liveness import dead_reason
from meter_platform.defs.resources import NatsResource
from meter_platform.ingestion.runs import RUN_SECONDS, ActiveRun, Backlog, plan_runs

# NOT_STARTED is left out on purpose: a run whose submission failed stays there forever.
ACTIVE_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
#: Run tags: a warm run (kept alive while nothing waits), and a run's drain budget in seconds.
WARM_TAG = "meter/warm"
BUDGET_TAG = "meter/budget_seconds"
#: Run monitoring cancels a run still going this long after its budget (it hangs).
OVERRUN_SECONDS = 600


@sensor(
    job=ingest_microbatch_job,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Keeps a warm ingest_microbatch_job run ready and adds runs while the JetStream "
    "consumer has more events waiting than one run keeps up with.",
)
def jetstream_backlog_sensor(context: SensorEvaluationContext, nats: NatsResource):
    """Look at the durable consumer's backlog and the runs already draining it."""
    limits = load_ingestion_settings()
    backlog = nats.backlog()
    waiting = backlog.pending + backlog.ack_pending
    records = [
        r
        for r in context.instance.get_run_records(
            RunsFilter(job_name=ingest_microbatch_job.name, statuses=ACTIVE_RUN_STATUSES)
        )
        if not _fail_if_dead(context, r, limits)
    ]
    # Events arrived since the last tick, even if a running drainer already took them.
    arriving = context.cursor is not None and backlog.last_seq > int(context.cursor)
    context.update_cursor(str(backlog.last_seq))
    plan = plan_runs([_active(r) for r in records], Backlog(backlog.pending, waiting, arriving), limits)
    if not plan.start:
        return SkipReason(f"{plan.reason} (stream at seq {backlog.last_seq})")
    tags = {"meter/backlog": str(waiting), "meter/stream_seq": str(backlog.last_seq)}
    if plan.handoff:
        tags["meter/handoff"] = "true"
    if not plan.warm:
        return RunRequest(tags=tags)
    budget = limits.warm_run_seconds
    config = {"max_seconds": budget, "idle_seconds": budget}
    return RunRequest(
        run_config={"ops": {"ingest_microbatches": {"config": config}}},
        tags={
            **tags,
            WARM_TAG: "true",
            BUDGET_TAG: f"{budget:g}",
            "dagster/max_runtime": str(int(budget) + OVERRUN_SECONDS),
        },
    )


def _active(record: RunRecord) -> ActiveRun:
    tags = record.dagster_run.tags
    try:
        budget = float(tags.get(BUDGET_TAG, RUN_SECONDS))
    except ValueError:
        budget = RUN_SECONDS
    return ActiveRun(age_seconds=_age(record), budget_seconds=budget, warm=tags.get(WARM_TAG) == "true")


def _fail_if_dead(context: SensorEvaluationContext, record: RunRecord, limits: IngestionSettings) -> bool:
    """Mark a run whose process is gone as failed (so neither this sensor nor the run queue counts it
    any longer); True when it was."""
    reason = dead_reason(record, limits)
    if reason is None:
        return False
    run = record.dagster_run
    message = (
        f"Run {run.run_id} taken for dead: {reason}; its un-acked messages are redelivered to the next run."
    )
    context.log.warning(message)
    context.instance.report_run_failed(run, message)
    return True


def _age(record) -> float:
    """Seconds since the run started (or was created, while it starts)."""
    started = record.start_time or record.create_timestamp.timestamp()
    return time.time() - started
