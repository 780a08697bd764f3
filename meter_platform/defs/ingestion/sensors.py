"""The sensor that keeps the stream drained: a run whenever events wait and too few runs drain them."""

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
from meter_platform.defs.ingestion.assets import RUN_SECONDS
from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.ingestion.liveness import dead_reason
from meter_platform.defs.resources import NatsResource

# NOT_STARTED is left out on purpose: a run whose submission failed stays there forever.
ACTIVE_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
#: A run stops after RUN_SECONDS (its time budget); its successor is requested this long before, so
#: under steady traffic a run is always draining instead of events waiting out a run launch.
HANDOFF_LEAD_SECONDS = 60.0


@sensor(
    job=ingest_microbatch_job,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests ingest_microbatch_job runs while the JetStream consumer has events waiting.",
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
    active = len(records)
    # Events arrived since the last tick, even if a running drainer already took them.
    arriving = context.cursor is not None and backlog.last_seq > int(context.cursor)
    context.update_cursor(str(backlog.last_seq))
    tags = {"meter/backlog": str(waiting), "meter/stream_seq": str(backlog.last_seq)}
    if active >= limits.max_ingest_runs:
        return SkipReason(f"{active} runs already draining (the limit); {waiting} messages waiting")
    if (
        active
        and (waiting or arriving)
        and all(_age(r) >= RUN_SECONDS - HANDOFF_LEAD_SECONDS for r in records)
    ):
        return RunRequest(tags={**tags, "meter/handoff": "true"})
    if waiting == 0:
        return SkipReason(f"no events waiting (stream at seq {backlog.last_seq})")
    if active > 0 and backlog.pending < limits.scale_out_backlog:
        return SkipReason(f"{waiting} messages waiting; {active} run(s) draining keep up")
    return RunRequest(tags=tags)


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
