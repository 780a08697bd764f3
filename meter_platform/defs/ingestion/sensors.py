"""The sensor that keeps the stream drained: a run whenever events wait and too few runs drain them."""

import os

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.resources import NatsResource

#: Runs that may drain at once (the run queue's tag limit in dagster.yaml enforces it too).
MAX_CONCURRENT_RUNS = int(os.environ.get("METER_MAX_INGEST_RUNS", "2"))
#: With one run already draining, start a second only when this many messages are undelivered.
SCALE_OUT_BACKLOG = int(os.environ.get("METER_SCALE_OUT_BACKLOG", "2000"))
# NOT_STARTED is left out on purpose: a run whose submission failed stays there forever.
ACTIVE_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


@sensor(
    job=ingest_microbatch_job,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests ingest_microbatch_job runs while the JetStream consumer has events waiting.",
)
def jetstream_backlog_sensor(context: SensorEvaluationContext, nats: NatsResource):
    """Look at the durable consumer's backlog and the runs already draining it."""
    backlog = nats.backlog()
    waiting = backlog.pending + backlog.ack_pending
    active = context.instance.get_runs_count(
        RunsFilter(job_name=ingest_microbatch_job.name, statuses=ACTIVE_RUN_STATUSES)
    )
    context.update_cursor(str(backlog.last_seq))
    if waiting == 0:
        return SkipReason(f"no events waiting (stream at seq {backlog.last_seq})")
    if active >= MAX_CONCURRENT_RUNS:
        return SkipReason(f"{waiting} messages waiting; {active} runs already draining (the limit)")
    if active > 0 and backlog.pending < SCALE_OUT_BACKLOG:
        return SkipReason(f"{waiting} messages waiting; {active} run(s) draining keep up")
    return RunRequest(
        tags={"meter/backlog": str(waiting), "meter/stream_seq": str(backlog.last_seq)},
    )
