"""Whether an ingestion run is still alive, seen from both sides.

From inside (the step draining JetStream): :class:`RunWatch` writes the run's heartbeat tag every few
seconds and tells the drain to stop once the run worker that started the step has exited or the run
is no longer ``STARTED`` (failed, canceled: nothing would record what the step does).

From outside (the backlog sensor): :func:`dead_reason` says a ``STARTED`` run is dead when its
heartbeat is older than ``METER_RUN_STALE_SECONDS`` (and it started longer ago than
``METER_RUN_START_GRACE_SECONDS``). A run whose processes died with the machine, or could not record
its end because PostgreSQL was gone, stays ``STARTED`` forever otherwise, and the run limit then holds
ingestion back for good. Un-acked messages of a dead run are redelivered to the next: safe by design.
"""

from __future__ import annotations

import time

from dagster import DagsterInstance, DagsterRunStatus, RunRecord

from meter_platform.config import IngestionSettings
from meter_platform.ingestion.drain import parent_exited

#: Run tag: when the run's drain last proved alive (seconds since the epoch).
HEARTBEAT_TAG = "meter/heartbeat"


class RunWatch:
    """The heartbeat and the stop condition of one run's drain (see :func:`drain`'s arguments)."""

    def __init__(self, instance: DagsterInstance, run_id: str) -> None:
        self.instance = instance
        self.run_id = run_id
        self._parent_exited = parent_exited()
        self.gone: str | None = None  # why the drain should stop, once it should

    def heartbeat(self) -> None:
        """Record that the run is alive, and notice when the instance no longer has it running."""
        self.instance.add_run_tags(self.run_id, {HEARTBEAT_TAG: f"{time.time():.3f}"})
        run = self.instance.get_run_by_id(self.run_id)
        if run is None or run.status != DagsterRunStatus.STARTED:
            self.gone = f"the run is {run.status.value if run else 'deleted'}"

    def should_stop(self) -> bool:
        """True once the run worker exited or the run is no longer running."""
        if self.gone is None and self._parent_exited():
            self.gone = "the run worker exited"
        return self.gone is not None


def last_heartbeat(record: RunRecord) -> float | None:
    """When the run's drain last proved alive (None: never, yet)."""
    raw = record.dagster_run.tags.get(HEARTBEAT_TAG)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def dead_reason(record: RunRecord, settings: IngestionSettings, now: float | None = None) -> str | None:
    """Why a ``STARTED`` run is taken for dead (None: it may be alive, or it is not ``STARTED``)."""
    if record.dagster_run.status != DagsterRunStatus.STARTED:
        return None  # queued and starting runs: the run queue and run monitoring's start timeout
    now = time.time() if now is None else now
    started = record.start_time or record.create_timestamp.timestamp()
    if now - started < settings.run_start_grace_seconds:
        return None
    beat = last_heartbeat(record)
    if beat is None:
        return f"no heartbeat since it started {now - started:.0f} s ago"
    if now - beat > settings.run_stale_seconds:
        return f"no heartbeat for {now - beat:.0f} s (limit {settings.run_stale_seconds:.0f} s)"
    return None
