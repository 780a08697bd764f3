"""The sensor that keeps the stream drained: a warm run always ready, more runs while events wait and
too few runs drain them (the decision: :func:`meter_platform.ingestion.runs.plan_runs`); with
METER_PARTITIONS above 1, so for each partition's consumer (:func:`~meter_platform.ingestion.runs.plan_partitions`)."""

import json
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

from meter_platform.capture import jetstream
from meter_platform.config import IngestionSettings, load_ingestion_settings
from meter_platform.defs.ingestion.jobs import INGEST_TAG, ingest_microbatch_job
from meter_platform.defs.ingestion.liveness import dead_reason
from meter_platform.defs.resources import NatsResource
from meter_platform.ingestion.runs import RUN_SECONDS, ActiveRun, Backlog, RunPlan, plan_partitions, plan_runs

# NOT_STARTED is left out on purpose: a run whose submission failed stays there forever.
ACTIVE_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
#: Run tags: a warm run (kept alive while nothing waits), and a run's drain budget in seconds.
WARM_TAG = "meter/warm"
BUDGET_TAG = "meter/budget_seconds"
#: With METER_PARTITIONS > 1: the partition a run drains (its op config says the same).
PARTITION_TAG = "meter/partition"
#: Run monitoring cancels a run still going this long after its budget (it hangs).
OVERRUN_SECONDS = 600


@sensor(
    job=ingest_microbatch_job,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Keeps a warm ingest_microbatch_job run ready and adds runs while the JetStream "
    "consumer has more events waiting than one run keeps up with (per partition with METER_PARTITIONS > 1).",
)
def jetstream_backlog_sensor(context: SensorEvaluationContext, nats: NatsResource):
    """Look at the durable consumers' backlog and the runs already draining them."""
    limits = load_ingestion_settings()
    backlog = nats.backlog()
    records = [
        r
        for r in context.instance.get_run_records(
            RunsFilter(job_name=ingest_microbatch_job.name, statuses=ACTIVE_RUN_STATUSES)
        )
        if not _fail_if_dead(context, r, limits)
    ]
    if len(backlog.partitions) > 1:
        return _partitioned(context, backlog, records, limits)
    waiting = backlog.pending + backlog.ack_pending
    # Events arrived since the last tick, even if a running drainer already took them.
    arriving = bool(context.cursor and context.cursor.isdigit()) and backlog.last_seq > int(
        context.cursor or 0
    )
    context.update_cursor(str(backlog.last_seq))
    plan = plan_runs([_active(r) for r in records], Backlog(backlog.pending, waiting, arriving), limits)
    if not plan.start:
        return SkipReason(f"{plan.reason} (stream at seq {backlog.last_seq})")
    return _request(plan, {"meter/backlog": str(waiting), "meter/stream_seq": str(backlog.last_seq)}, limits)


def _partitioned(
    context: SensorEvaluationContext,
    backlog: jetstream.Backlog,
    records: list[RunRecord],
    limits: IngestionSettings,
) -> SkipReason | list[RunRequest]:
    """One decision per partition, from its own consumer's backlog and the runs draining it.

    The cursor keeps, per partition, the last stream sequence its consumer delivered: when it grew
    since the last tick, events arrived there even if a running drainer already took them.
    """
    seen = _delivered_cursor(context.cursor)
    backlogs = [
        Backlog(
            p.pending, p.pending + p.ack_pending, p.partition in seen and p.delivered_seq > seen[p.partition]
        )
        for p in backlog.partitions
    ]
    context.update_cursor(json.dumps({str(p.partition): p.delivered_seq for p in backlog.partitions}))
    plans = plan_partitions([_active(r) for r in records], backlogs, limits)
    requests = [
        _request(
            plan,
            {
                "meter/backlog": str(backlogs[plan.partition].waiting),
                "meter/stream_seq": str(backlog.last_seq),
                PARTITION_TAG: str(plan.partition),
                # dagster.yaml limits runs per value of this tag: the limit holds per partition.
                **{key: f"{value}-p{plan.partition}" for key, value in INGEST_TAG.items()},
            },
            limits,
        )
        for plan in plans
        if plan.start
    ]
    if requests:
        return requests
    reasons = "; ".join(f"p{plan.partition}: {plan.reason}" for plan in plans)
    return SkipReason(f"{reasons} (stream at seq {backlog.last_seq})")


def _delivered_cursor(cursor: str | None) -> dict[int, int]:
    """The per-partition cursor; empty when there is none yet or it is the unpartitioned one."""
    if not cursor or not cursor.startswith("{"):
        return {}
    try:
        return {int(k): int(v) for k, v in json.loads(cursor).items()}
    except (ValueError, AttributeError):
        return {}


def _request(plan: RunPlan, tags: dict[str, str], limits: IngestionSettings) -> RunRequest:
    """The run a plan asks for: a busy run, or a warm one configured to stay for its budget; with a
    partition's tag, configured to drain that partition."""
    if plan.handoff:
        tags["meter/handoff"] = "true"
    config: dict[str, float | int] = {"partition": plan.partition} if PARTITION_TAG in tags else {}
    if plan.warm:
        budget = limits.warm_run_seconds
        config = {**config, "max_seconds": budget, "idle_seconds": budget}
        tags = {
            **tags,
            WARM_TAG: "true",
            BUDGET_TAG: f"{budget:g}",
            "dagster/max_runtime": str(int(budget) + OVERRUN_SECONDS),
        }
    if not config:
        return RunRequest(tags=tags)
    return RunRequest(run_config={"ops": {"ingest_microbatches": {"config": config}}}, tags=tags)


def _active(record: RunRecord) -> ActiveRun:
    tags = record.dagster_run.tags
    try:
        budget = float(tags.get(BUDGET_TAG, RUN_SECONDS))
    except ValueError:
        budget = RUN_SECONDS
    try:
        partition = int(tags.get(PARTITION_TAG, 0))
    except ValueError:
        partition = 0
    return ActiveRun(
        age_seconds=_age(record),
        budget_seconds=budget,
        warm=tags.get(WARM_TAG) == "true",
        partition=partition,
    )


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
