"""The ingestion runs the backlog sensor keeps: the decision as a plain function, and a warm run's drain
taking events that arrive after a quiet spell."""

from __future__ import annotations

import asyncio
import threading
import time

from meter_platform.config import DrainSettings, IngestionSettings
from meter_platform.ingestion.drain import drain
from meter_platform.ingestion.runs import HANDOFF_LEAD_SECONDS, ActiveRun, Backlog, plan_partitions, plan_runs
from tests.helpers import api_call, publish, scalar

WARM = IngestionSettings(warm_runs=1, warm_run_seconds=1800)
COLD = IngestionSettings(warm_runs=0)
QUIET = Backlog(pending=0, waiting=0, arriving=False)


def _warm(age: float) -> ActiveRun:
    return ActiveRun(age_seconds=age, budget_seconds=1800, warm=True)


def _busy(age: float) -> ActiveRun:
    return ActiveRun(age_seconds=age, budget_seconds=300, warm=False)


def test_a_warm_run_is_started_when_none_is_there_even_with_nothing_waiting():
    plan = plan_runs([], QUIET, WARM)
    assert plan.start and plan.warm and not plan.handoff
    # A busy run alone does not count: it stops after a minute without events.
    plan = plan_runs([_busy(10)], QUIET, WARM)
    assert plan.start and plan.warm


def test_a_young_warm_run_is_enough_while_it_keeps_up():
    assert not plan_runs([_warm(10)], QUIET, WARM).start
    assert not plan_runs([_warm(10)], Backlog(pending=50, waiting=60, arriving=True), WARM).start


def test_the_warm_runs_successor_is_requested_before_its_budget_ends():
    near_end = _warm(1800 - HANDOFF_LEAD_SECONDS + 1)
    plan = plan_runs([near_end], QUIET, WARM)
    assert plan.start and plan.warm and plan.handoff
    # Once the successor is there (young), nothing more is requested.
    assert not plan_runs([near_end, _warm(5)], QUIET, WARM).start


def test_a_deep_backlog_adds_a_busy_run_beside_the_warm_one_up_to_the_limit():
    deep = Backlog(pending=WARM.scale_out_backlog, waiting=WARM.scale_out_backlog, arriving=True)
    plan = plan_runs([_warm(10)], deep, WARM)
    assert plan.start and not plan.warm
    plan = plan_runs([_warm(10), _busy(5)], deep, WARM)
    assert not plan.start and "the limit" in plan.reason


def test_without_warm_runs_a_run_starts_only_while_events_wait():
    assert not plan_runs([], QUIET, COLD).start
    plan = plan_runs([], Backlog(pending=3, waiting=3, arriving=True), COLD)
    assert plan.start and not plan.warm
    # A busy run near its end with traffic still arriving: its successor.
    plan = plan_runs([_busy(300 - HANDOFF_LEAD_SECONDS)], Backlog(0, 0, arriving=True), COLD)
    assert plan.start and plan.handoff and not plan.warm


def test_a_warm_drain_takes_events_arriving_after_a_quiet_spell(nats_server, database_url, catalog, clean):
    """The drain of a warm run does not stop when idle: events sent after a quiet spell are stored by
    it, without a new run (the bench measures how fast; here it must simply happen, well within its
    budget)."""
    stop = threading.Event()
    settings = DrainSettings(batch_size=100, fetch_timeout=0.3, max_seconds=60, idle_seconds=60)
    worker = threading.Thread(
        target=lambda: asyncio.run(
            drain(nats_server.url, database_url, catalog, settings, should_stop=stop.is_set)
        ),
        daemon=True,
    )
    worker.start()
    try:
        time.sleep(2.0)  # quiet: longer than several fetch timeouts
        publish(nats_server.url, api_call("after-quiet"))
        deadline = time.monotonic() + 20
        while scalar(database_url, "SELECT count(*) FROM usage_events WHERE id = 'after-quiet'") == 0:
            assert time.monotonic() < deadline, "the warm drain did not take the event"
            time.sleep(0.05)
        assert worker.is_alive(), "the warm drain stopped instead of staying ready"
    finally:
        stop.set()
        worker.join(10)


def test_a_drain_reports_where_its_time_went_stage_by_stage(nats_server, database_url, catalog, clean):
    """Every pipeline stage of every batch is timed (the bench prints the shares), and the stages are
    the whole batch: none is left out when nothing is quarantined or nothing aggregated."""
    from meter_platform.ingestion.timing import STAGES
    from tests.helpers import run_drain

    publish(nats_server.url, [api_call("t1"), api_call("t2"), api_call(None, customer="")])
    counts = run_drain(nats_server.url, database_url, catalog)
    assert counts.batches >= 1 and counts.stored == 2 and counts.quarantined == 1
    assert set(counts.stages) == set(STAGES)
    assert all(seconds >= 0 for seconds in counts.stages.values())
    assert counts.stages["commit"] > 0 and counts.stages["insert"] > 0


def test_each_partition_keeps_its_own_warm_run_and_adds_busy_runs_from_its_own_backlog():
    """With METER_PARTITIONS above 1 the same decision is made per partition: a warm run each; a busy
    run only where that partition's consumer has a deep backlog; the run limit per partition."""
    deep = Backlog(pending=WARM.scale_out_backlog, waiting=WARM.scale_out_backlog, arriving=True)
    plans = plan_partitions([], [QUIET, QUIET, QUIET], WARM)
    assert [(p.partition, p.start, p.warm) for p in plans] == [
        (0, True, True),
        (1, True, True),
        (2, True, True),
    ]

    warm_each = [ActiveRun(age_seconds=10, budget_seconds=1800, warm=True, partition=p) for p in range(3)]
    plans = plan_partitions(warm_each, [QUIET, deep, QUIET], WARM)
    assert [(p.partition, p.start, p.warm) for p in plans] == [
        (0, False, False),
        (1, True, False),
        (2, False, False),
    ]

    # Partition 1 at its limit (its warm run and a busy run); partition 0's runs do not count there.
    busy_1 = ActiveRun(age_seconds=5, budget_seconds=300, warm=False, partition=1)
    plans = plan_partitions([*warm_each, busy_1], [deep, deep, QUIET], WARM)
    assert plans[1].start is False and "the limit" in plans[1].reason
    assert plans[0].start and not plans[0].warm  # partition 0's backlog gets its own busy run
    # Unpartitioned, plan_partitions is plan_runs.
    assert plan_partitions(warm_each[:1], [deep], WARM) == [plan_runs(warm_each[:1], deep, WARM)]
