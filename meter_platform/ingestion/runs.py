"""How many ingestion runs to keep, and when to start the next: the backlog sensor's decision as a
plain function (the sensor in ``defs/ingestion/sensors.py`` only gathers its inputs).

Two kinds of runs drain the durable consumer:

- a **warm** run (``METER_WARM_RUNS=1``, the default) is kept alive whether or not events wait, for
  ``METER_WARM_RUN_SECONDS`` (default 30 minutes): the first events after an hour of quiet are taken
  within a fetch (about a second) instead of waiting out a run launch (10-25 s). Its successor is
  requested :data:`HANDOFF_LEAD_SECONDS` before its budget ends, so one is always there.
- a **busy** run (5 minutes, stops after 60 s without events) is added while the backlog is deeper
  than one run keeps up with, and stands in when warm runs are off.

Both drain the same consumer; the per-message ledger makes it safe for several to do so at once.
With ``METER_PARTITIONS`` above 1 each partition has its own consumer, and so its own warm run and
busy runs, decided from its own backlog (:func:`plan_partitions`): the partitions drain in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meter_platform.config import DrainSettings, IngestionSettings

#: A run stops after its budget; its successor is requested this long before, so under steady
#: traffic a run is always draining instead of events waiting out a run launch (10-25 s).
HANDOFF_LEAD_SECONDS = 60.0
#: The time budget of a busy run.
RUN_SECONDS = DrainSettings.max_seconds


@dataclass(frozen=True)
class ActiveRun:
    """A queued, starting or started ingestion run, as the decision needs it."""

    age_seconds: float  # since it started (or was created, while it starts)
    budget_seconds: float  # its drain's time budget
    warm: bool
    partition: int = 0  # the partition whose consumer it drains

    @property
    def leaving(self) -> bool:
        """Near the end of its budget: its successor should be on its way."""
        return self.age_seconds >= self.budget_seconds - HANDOFF_LEAD_SECONDS


@dataclass(frozen=True)
class Backlog:
    """What waits in the consumer: not yet delivered (``pending``) plus delivered, not acked."""

    pending: int
    waiting: int
    arriving: bool  # the stream grew since the last look, even if a run already took the events


@dataclass(frozen=True)
class RunPlan:
    """Start a run (of which kind), or why not."""

    start: bool
    reason: str
    warm: bool = False
    handoff: bool = False
    partition: int = 0


def plan_runs(runs: list[ActiveRun], backlog: Backlog, limits: IngestionSettings) -> RunPlan:
    """Whether to start an ingestion run now, given the runs alive and the consumer's backlog."""
    if len(runs) >= limits.max_ingest_runs:
        return RunPlan(False, f"{len(runs)} runs already draining (the limit); {backlog.waiting} waiting")
    staying = [r for r in runs if not r.leaving]
    if limits.warm_runs and not any(r.warm for r in staying):
        why = "the warm run nears the end of its budget" if runs else "no run is ready for new events"
        return RunPlan(True, f"{why}: starting a warm run", warm=True, handoff=bool(runs))
    if runs and not staying and (backlog.waiting or backlog.arriving):
        return RunPlan(True, "every run nears the end of its budget and events arrive", handoff=True)
    if backlog.waiting == 0:
        return RunPlan(False, "no events waiting")
    if staying and backlog.pending < limits.scale_out_backlog:
        return RunPlan(False, f"{backlog.waiting} messages waiting; {len(staying)} run(s) draining keep up")
    return RunPlan(True, f"{backlog.waiting} messages waiting")


def plan_partitions(
    runs: list[ActiveRun], backlogs: list[Backlog], limits: IngestionSettings
) -> list[RunPlan]:
    """:func:`plan_runs` for each partition (``backlogs[p]`` is partition p's consumer's), with the
    runs draining that partition: the limits hold per partition. Runs of a partition beyond the
    layout (N lowered while they drain) are not counted: they end on their own."""
    return [
        replace(plan_runs([r for r in runs if r.partition == p], backlog, limits), partition=p)
        for p, backlog in enumerate(backlogs)
    ]
