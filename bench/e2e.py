"""End to end: how fast and how soon events sent to the gateway show up in the usage aggregates.

The pipeline's drain() runs in its own process (``--role drain``) while the gateway receives batches,
first as fast as the clients can send ("max"), then paced at a steady rate ("steady").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from clients import LoadClient, count_error
from events import EventFactory, utc_stamp
from report import fmt_ms, pct, say
from stack import CpuMeter, Stack, peak_rss_mb

from meter_platform.storage import db


@dataclass
class E2EResult:
    """One end-to-end stage."""

    name: str
    target_rate: float | None
    accepted: int = 0
    send_seconds: float = 0.0
    visible_during_send: int = 0  # events that became visible in the aggregates while sending
    visible_total: int = 0  # events visible at the end of the stage
    drain_exit: int | None = None  # the drain process's exit code, when it died
    total_seconds: float = 0.0  # first send until the last event is visible
    caught_up: bool = False
    max_backlog: int = 0
    freshness: list[float] = field(default_factory=list)
    probes_lost: int = 0
    latencies: list[float] = field(default_factory=list)
    probes: list[tuple[str, str]] = field(default_factory=list)  # (event id, its unique customer)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    drain: dict[str, float] = field(default_factory=dict)

    @property
    def send_eps(self) -> float:
        return self.accepted / self.send_seconds if self.send_seconds else 0.0

    @property
    def visible_eps_during_send(self) -> float:
        return self.visible_during_send / self.send_seconds if self.send_seconds else 0.0

    @property
    def e2e_eps(self) -> float:
        return self.accepted / self.total_seconds if self.caught_up and self.total_seconds else 0.0


class Visibility:
    """Polls PostgreSQL: which probe ids are stored (and with them aggregated: same transaction), and
    how many api_call events the ``api_calls`` meter has counted."""

    def __init__(self, database_url: str, interval: float):
        self.url = db.libpq_url(database_url)
        self.interval = interval
        self.outstanding: dict[str, float] = {}  # probe id -> time of its 202 (perf_counter)
        self.freshness: list[float] = []
        self.counted = 0

    async def count(self, conn: psycopg.AsyncConnection) -> int:
        cur = await conn.execute(
            "SELECT coalesce(sum(event_count), 0) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run(self, stop: asyncio.Event, on_count: Callable[[int], None]) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            last_count = 0.0
            while not stop.is_set():
                if self.outstanding:
                    ids = list(self.outstanding)
                    cur = await conn.execute("SELECT id FROM usage_events WHERE id = ANY(%s)", (ids,))
                    seen = await cur.fetchall()
                    now = time.perf_counter()
                    for (event_id,) in seen:
                        self.freshness.append(now - self.outstanding.pop(event_id))
                if time.perf_counter() - last_count >= 0.25:
                    last_count = time.perf_counter()
                    self.counted = await self.count(conn)
                    on_count(self.counted)
                await asyncio.sleep(self.interval)


def _read_drain_stats(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def _send_stage(
    client: LoadClient,
    args: argparse.Namespace,
    factory: EventFactory,
    rate: float | None,
    start: float,
    res: E2EResult,
    vis: Visibility,
    accepted: list[int],
) -> None:
    """``concurrency`` workers send batches until ``--events`` or ``--e2e-duration``, paced at ``rate``;
    every ``--probe-interval`` a batch carries a probe. ``accepted[0]`` grows as 202s arrive."""
    batch = args.batch_size
    deadline = None if args.events else start + args.e2e_duration
    interval = batch / rate if rate else 0.0
    next_probe = [start]
    counter = [0]

    async def worker(w: int) -> None:
        while True:
            k = counter[0]
            if (args.events and k * batch >= args.events) or (deadline and time.perf_counter() >= deadline):
                return
            counter[0] += 1
            if interval:
                delay = start + k * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            probe = None
            if time.perf_counter() >= next_probe[0]:
                next_probe[0] += args.probe_interval
                probe = f"probe-{factory.prefix}-{factory.n}"  # the number of its event: unique
            body, first_id = factory.body(batch, probe_customer=probe)
            t0 = time.perf_counter()
            try:
                status = await client.post(w, body)
            except (OSError, httpx.HTTPError, asyncio.IncompleteReadError) as exc:
                count_error(res.errors, type(exc).__name__)
                return
            t1 = time.perf_counter()
            if status != 202:
                count_error(res.errors, str(status))
                continue
            accepted[0] += batch
            res.latencies.append(t1 - t0)
            if probe is not None:
                vis.outstanding[first_id] = t1
                res.probes.append((first_id, probe))

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))


async def _wait_for_catch_up(
    stack: Stack, args: argparse.Namespace, res: E2EResult, vis: Visibility, expected: int
) -> None:
    """Wait for the pipeline to catch up: every accepted event counted by the meter (or the drain died)."""
    wait_until = time.perf_counter() + args.catch_up_timeout
    while time.perf_counter() < wait_until:
        if vis.counted >= expected and not vis.outstanding:
            res.caught_up = True
            break
        if stack.drain is not None and stack.drain.poll() is not None:
            res.drain_exit = stack.drain.returncode
            break
        await asyncio.sleep(args.poll_interval)


async def e2e_stage(
    stack: Stack,
    args: argparse.Namespace,
    factory: EventFactory,
    name: str,
    rate: float | None,
    baseline: int,
    stats_file: Path,
) -> E2EResult:
    """Send through the gateway (paced at ``rate`` events/s, or as fast as possible) while the drain
    runs; wait until the aggregates hold every accepted event."""
    assert stack.pg is not None
    res = E2EResult(name, rate)
    vis = Visibility(stack.pg.url, args.poll_interval)
    stop_polling = asyncio.Event()
    accepted = [0]
    backlog = [0]

    def on_count(counted: int) -> None:
        backlog[0] = max(backlog[0], baseline + accepted[0] - counted)

    drain_before = _read_drain_stats(stats_file)
    poller = asyncio.create_task(vis.run(stop_polling, on_count))
    async with LoadClient(stack.gateway_url, args.concurrency, args.client, stack.api_key) as client:
        cpu = CpuMeter(stack)
        cpu.start()
        start = time.perf_counter()
        await _send_stage(client, args, factory, rate, start, res, vis, accepted)
        sent_at = time.perf_counter()
        res.accepted = accepted[0]
        res.send_seconds = sent_at - start
        counted_at_send_end = await _count_now(stack.pg.url)
        res.visible_during_send = counted_at_send_end - baseline
        await _wait_for_catch_up(stack, args, res, vis, baseline + res.accepted)
        res.total_seconds = time.perf_counter() - start
        res.visible_total = vis.counted - baseline
        res.cpu = cpu.stop()
        # Peak memory so far of the processes the targets name (the gateway, the drain).
        res.peak_rss_mb = {
            n: peak_rss_mb(pid) for n, pid in stack.pids().items() if n in ("gateway", "drain")
        }
    stop_polling.set()
    await poller
    res.freshness = vis.freshness
    res.probes_lost = len(vis.outstanding)
    res.max_backlog = backlog[0]
    after = _read_drain_stats(stats_file)
    res.drain = {k: after.get(k, 0) - drain_before.get(k, 0) for k in after}
    return res


async def _count_now(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(db.libpq_url(database_url), autocommit=True) as conn:
        return await Visibility(database_url, 0).count(conn)


async def verify(stack: Stack, probes: list[tuple[str, str]], t_from: datetime, accepted: int) -> list[str]:
    """Check through the public API: probes stored and counted, the meter's total, the ledger."""
    lines = []
    t_to = datetime.now(UTC) + timedelta(minutes=6)
    window = {"from": utc_stamp(t_from - timedelta(minutes=1)), "to": utc_stamp(t_to)}
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, timeout=60, headers=stack.auth_headers
    ) as client:
        bad = 0
        for event_id, customer in probes:
            ev = (await client.get(f"/v1/events/{event_id}")).json()
            usage = (
                await client.get("/v1/meters/api_calls/usage", params={**window, "customer_id": customer})
            ).json()
            value = sum(row["value"] for row in usage.get("data", []))
            if ev.get("state") != "stored" or value != 1:
                bad += 1
                if bad <= 3:
                    lines.append(
                        f"probe {event_id}: state {ev.get('state')!r}, usage of {customer} = {value} "
                        f"({json.dumps(usage)[:300]})"
                    )
        lines.append(
            f"probes via GET /v1/events/{{id}} (state stored) and /v1/meters/api_calls/usage "
            f"(value 1 for the probe's customer): {len(probes) - bad}/{len(probes)} "
            f"{'OK' if bad == 0 else 'MISMATCH'}"
        )
        usage = (await client.get("/v1/meters/api_calls/usage", params=window)).json()
        total = sum(row["value"] for row in usage.get("data", []))
        lines.append(
            f"GET /v1/meters/api_calls/usage total = {total}, events accepted = {accepted}: "
            f"{'OK' if total == accepted else 'MISMATCH'}"
        )
        status = (await client.get("/v1/ingest/status")).json()
    lines.append("GET /v1/ingest/status: " + json.dumps(status))
    ev = status.get("events", {})
    ledger = ev.get("stored", 0) + ev.get("duplicates", 0) + ev.get("quarantined", 0)
    lines.append(
        f"stored {ev.get('stored')} + duplicates {ev.get('duplicates')} + quarantined "
        f"{ev.get('quarantined')} = {ledger}, events accepted = {accepted}: "
        f"{'OK' if ledger == accepted else 'MISMATCH'}"
    )
    consumer = status.get("consumer", {})
    lines.append(
        f"stream messages left {status.get('stream', {}).get('messages')}, consumer pending "
        f"{consumer.get('pending')}: {'OK' if not consumer.get('pending') else 'MISMATCH'}"
    )
    return lines


async def run_e2e(
    stack: Stack, args: argparse.Namespace, factory: EventFactory
) -> tuple[list[E2EResult], list[str]]:
    assert stack.tmp is not None and stack.pg is not None
    stats_file = stack.tmp / "drain-stats.json"
    stack.start_drain(args.drain_batch, stats_file)
    await asyncio.sleep(1.0)  # the child imports the pipeline (polars, pandera) before it fetches
    started = datetime.now(UTC)
    stages: list[E2EResult] = []
    baseline = 0
    if args.e2e_rate is None:
        first = await e2e_stage(stack, args, factory, "max", None, baseline, stats_file)
        stages.append(first)
        baseline += first.accepted
        say(
            f"e2e max: sent {first.send_eps:,.0f} ev/s, into aggregates "
            f"{first.visible_eps_during_send:,.0f} ev/s while sending, freshness p50 "
            f"{fmt_ms(pct(first.freshness, 50))} ms"
        )
        basis = first.e2e_eps or (first.visible_total / first.total_seconds if first.total_seconds else 0.0)
        rate = max(args.batch_size, round(basis * args.steady_fraction, -2))
    else:
        rate = args.e2e_rate
    steady = await e2e_stage(stack, args, factory, "steady", rate, baseline, stats_file)
    stages.append(steady)
    say(
        f"e2e steady: sent {steady.send_eps:,.0f} ev/s, freshness p50 {fmt_ms(pct(steady.freshness, 50))} ms, "
        f"p95 {fmt_ms(pct(steady.freshness, 95))} ms"
    )
    accepted = sum(s.accepted for s in stages)
    every = [p for s in stages for p in s.probes]
    probes = every[:: max(1, len(every) // 20)]
    checks = await verify(stack, probes, started, accepted)
    return stages, checks
