"""End-to-end throughput against the number of drainers: METER_PARTITIONS = N, one drain process per
partition, for N in ``--drainers`` (default 1, 2 and 4).

Run with ``.venv/bin/python bench/drainers.py`` on a machine with nothing else running. For each N it
starts its own stack (nats-server with fsync, PostgreSQL, the gateway with ``METER_PARTITIONS=N``, in
a fresh temporary folder), then:

1. **backlog**: publishes ``--events`` events straight to the stream while nothing drains, as gateway
   messages of ``--batch-size`` events each holding one partition's customers (the same message shape
   for every N), starts N drain processes (``ingest_bench.py --role drain --partition p``, the
   pipeline's ``drain()``), and times from the first event counted in ``usage_minute_aggregates``
   until the last: the drainers' rate on a full backlog, without the load generator and the gateway
   competing for the cores;
2. **live**: with the drainers running, sends requests of ``--batch-size`` events through the gateway
   (with ``METER_PARTITIONS=N``: each request split by customer, parts merged per partition by group
   commit) as fast as it accepts them for ``--live-seconds``, and times from the first request until
   every accepted event is counted (e2e ev/s).

Then it checks that the meter counted every accepted event exactly once and that the consumers hold
nothing (``GET /v1/ingest/status``). It prints events/s per N and the ratio to one drainer, with the
CPU of each process; it never fails on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import psycopg
from clients import LoadClient, count_error
from events import EventFactory
from report import say
from stack import BENCH_SCRIPT, Stack, _stop_process, cpu_seconds, machine_busy_seconds, own_cpu_seconds

from meter_platform.capture import jetstream
from meter_platform.capture.envelope import Event, GatewayBatch, encode_batch, now_us
from meter_platform.capture.partitions import gateway_subject, partition_of
from meter_platform.config import BATCH_HEADER
from meter_platform.runtime.servers import spawn
from meter_platform.storage import db


@dataclass
class Round:
    """The figures of one N."""

    drainers: int
    backlog_events: int = 0
    backlog_seconds: float = 0.0
    live_accepted: int = 0
    live_send_seconds: float = 0.0
    live_total_seconds: float = 0.0
    caught_up: bool = True
    counted: int = 0
    accepted: int = 0
    pending_after: Any = None
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # while the backlog drains
    live_cpu: dict[str, float] = field(default_factory=dict)  # while sending live and catching up
    per_drainer_events: list[int] = field(default_factory=list)

    @property
    def backlog_eps(self) -> float:
        return self.backlog_events / self.backlog_seconds if self.backlog_seconds else 0.0

    @property
    def live_sent_eps(self) -> float:
        return self.live_accepted / self.live_send_seconds if self.live_send_seconds else 0.0

    @property
    def live_eps(self) -> float:
        return self.live_accepted / self.live_total_seconds if self.live_total_seconds else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--drainers", default="1,2,4", help="drainer counts (= METER_PARTITIONS) to measure")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds per count, interleaved (1,2,4,1,2,4...); medians printed",
    )
    p.add_argument("--events", type=int, default=150_000, help="events in the backlog each round drains")
    p.add_argument("--live-seconds", type=float, default=15.0, help="seconds of live sending (0: skip)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent HTTP clients")
    p.add_argument("--batch-size", type=int, default=100, help="events per request")
    p.add_argument(
        "--drain-batch",
        type=int,
        default=100,
        help="messages per fetch of drain() (the job's 500 would drain a backlog in a few fetches, too "
        "coarse to time)",
    )
    p.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP load generator")
    p.add_argument("--gateway-workers", type=int, default=1, help="uvicorn worker processes of the gateway")
    p.add_argument(
        "--catch-up-timeout", type=float, default=300.0, help="max seconds to wait for the drainers"
    )
    p.add_argument("--tmp-dir", help="parent folder of the temp dirs (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, data) afterwards")
    return p.parse_args(argv)


async def _count(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute(
        "SELECT coalesce(sum(event_count), 0) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _send(
    stack: Stack, args: argparse.Namespace, factory: EventFactory, events: int | None, seconds: float | None
) -> tuple[int, dict[str, int]]:
    """Send batches through the gateway until ``events`` are accepted or ``seconds`` have passed."""
    accepted, errors, sent = [0], {}, [0]
    deadline = time.perf_counter() + seconds if seconds else None

    async def worker(client: LoadClient, w: int) -> None:
        while True:
            if (events is not None and sent[0] >= events) or (deadline and time.perf_counter() >= deadline):
                return
            sent[0] += args.batch_size
            body, _ = factory.body(args.batch_size)
            try:
                status = await client.post(w, body)
            except (OSError, httpx.HTTPError, asyncio.IncompleteReadError) as exc:
                count_error(errors, type(exc).__name__)
                return
            if status == 202:
                accepted[0] += args.batch_size
            else:
                count_error(errors, str(status))

    async with LoadClient(stack.gateway_url, args.concurrency, args.client, stack.api_key) as client:
        await asyncio.gather(*(worker(client, w) for w in range(args.concurrency)))
    return accepted[0], errors


async def _load(stack: Stack, args: argparse.Namespace, n: int, factory: EventFactory) -> int:
    """``--events`` events straight into the stream as gateway messages of ``--batch-size`` events,
    each message one partition's: the same message shape for every N, so that the backlog stage
    compares drainer counts alone (through the gateway, group commit makes bigger messages with N > 1)."""
    assert stack.nats is not None
    nc = await jetstream.connect(stack.nats.url, name="bench-load")
    try:
        js = nc.jetstream(publish_async_max_pending=args.concurrency)
        parts: dict[int, list[Event]] = {}
        loaded = 0

        async def send(p: int) -> None:
            batch = GatewayBatch(received_at=now_us(), events=parts.pop(p))
            await js.publish_async(gateway_subject(p, n), encode_batch(batch), headers={BATCH_HEADER: "1"})

        while loaded < args.events:
            body, _ = factory.body(args.batch_size)
            for event in msgspec.json.decode(body, type=list[Event]):
                p = partition_of(event.customer_id, n)
                parts.setdefault(p, []).append(event)
                if len(parts[p]) == args.batch_size:
                    await send(p)
                    loaded += args.batch_size
        for p in list(parts):
            loaded += len(parts[p])
            await send(p)
        await asyncio.wait_for(js.publish_async_completed(), 120)
    finally:
        await nc.close()
    return loaded


async def _wait_counted(
    conn: psycopg.AsyncConnection, target: int, timeout: float, drains: list[subprocess.Popen]
) -> tuple[float | None, int, float | None]:
    """Poll until ``target`` events are counted: (time of the first poll that saw progress, the count
    then, time the target was reached (None: timeout or a drainer died))."""
    start_count = await _count(conn)
    first_at: float | None = None
    first_count = start_count
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        counted = await _count(conn)
        now = time.perf_counter()
        if first_at is None and counted > start_count:
            first_at, first_count = now, counted
        if counted >= target:
            return first_at, first_count, now
        if any(d.poll() is not None for d in drains):
            return first_at, first_count, None
        await asyncio.sleep(0.05)
    return first_at, first_count, None


def _start_drains(stack: Stack, n: int, args: argparse.Namespace) -> list[subprocess.Popen]:
    assert stack.nats and stack.pg and stack.tmp
    drains = []
    for p in range(n):
        cmd = [
            sys.executable, str(BENCH_SCRIPT), "--role", "drain", "--nats-url", stack.nats.url,
            "--database-url", stack.pg.url, "--drain-batch", str(args.drain_batch),
            "--stats-file", str(stack.tmp / f"drain-p{p}.json"), "--partition", str(p),
        ]  # fmt: skip
        drains.append(spawn(cmd, stack.tmp / f"drain-p{p}.log", env=stack.env))
    return drains


async def _round(stack: Stack, args: argparse.Namespace, n: int, factory: EventFactory) -> Round:
    assert stack.pg is not None and stack.tmp is not None
    res = Round(n)
    loaded = await _load(stack, args, n, factory)
    say(f"N={n}: {loaded:,} events in the backlog (messages of {args.batch_size}); starting {n} drainer(s)")
    drains = _start_drains(stack, n, args)
    try:
        async with await psycopg.AsyncConnection.connect(db.libpq_url(stack.pg.url), autocommit=True) as conn:
            pids = {**stack.pids(), **{f"drain-p{p}": d.pid for p, d in enumerate(drains)}}
            meter = _Cpu(pids)
            first_at, first_count, done_at = await _wait_counted(conn, loaded, args.catch_up_timeout, drains)
            res.cpu = meter.stop()
            if first_at is None or done_at is None:
                res.caught_up = False
                return res
            res.backlog_events, res.backlog_seconds = loaded - first_count, done_at - first_at
            say(f"N={n}: backlog drained at {res.backlog_eps:,.0f} ev/s")
            if args.live_seconds > 0 and not await _live(
                stack, args, factory, conn, drains, res, loaded, pids
            ):
                return res
            res.accepted = loaded + res.live_accepted
            res.counted = await _count(conn)
            res.pending_after = await _acked(stack)
    finally:
        for d in drains:
            _stop_process(d)
    for p in range(n):
        stats_file = stack.tmp / f"drain-p{p}.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        res.per_drainer_events.append(int(stats.get("events", 0)))
    return res


async def _live(
    stack: Stack,
    args: argparse.Namespace,
    factory: EventFactory,
    conn: psycopg.AsyncConnection,
    drains: list[subprocess.Popen],
    res: Round,
    loaded: int,
    pids: dict[str, int],
) -> bool:
    """Send as fast as the gateway accepts for ``--live-seconds`` while the drainers run; time until
    every accepted event is counted. False when the drainers did not catch up."""
    meter = _Cpu(pids)
    started = time.perf_counter()
    res.live_accepted, errors = await _send(stack, args, factory, None, args.live_seconds)
    res.live_send_seconds = time.perf_counter() - started
    for k, v in errors.items():
        res.errors[k] = res.errors.get(k, 0) + v
    _, _, done_at = await _wait_counted(conn, loaded + res.live_accepted, args.catch_up_timeout, drains)
    res.live_cpu = meter.stop()
    if done_at is None:
        res.caught_up = False
        return False
    res.live_total_seconds = done_at - started
    say(f"N={res.drainers}: live: sent {res.live_sent_eps:,.0f} ev/s, e2e {res.live_eps:,.0f} ev/s")
    return True


class _Cpu:
    """CPU of the given processes (and of the load generator, and of everything else) from now until
    stop(), as % of one core."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.client0, self.busy0, self.wall0 = own_cpu_seconds(), machine_busy_seconds(), time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall0
        out = {name: 100 * (cpu_seconds(pid) - self.before[name]) / wall for name, pid in self.pids.items()}
        out["client"] = 100 * (own_cpu_seconds() - self.client0) / wall
        out["other"] = max(0.0, 100 * (machine_busy_seconds() - self.busy0) / wall - sum(out.values()))
        return out


async def _acked(stack: Stack, timeout: float = 15.0) -> Any:
    """The consumers' pending messages once the drainers have acked what they committed (a drain acks
    right after its commit, so counted events may still await their ack for a moment)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, headers=stack.auth_headers, timeout=30
    ) as client:
        while True:
            pending = (await client.get("/v1/ingest/status")).json().get("consumer", {}).get("pending")
            if pending == 0 or time.monotonic() > deadline:
                return pending
            await asyncio.sleep(0.2)


def _cpu(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(figures.items()))


def _print(rounds: list[Round]) -> None:
    counts = sorted({r.drainers for r in rounds})
    backlog = {n: statistics.median(r.backlog_eps for r in rounds if r.drainers == n) for n in counts}
    live = {n: statistics.median(r.live_eps for r in rounds if r.drainers == n) for n in counts}
    sent = {n: statistics.median(r.live_sent_eps for r in rounds if r.drainers == n) for n in counts}
    one = counts[0]

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}" if base else "-"

    print()
    print("DRAINERS (METER_PARTITIONS = N, one drain process per partition; medians of the rounds)")
    print(
        f"  {'N':>2}  {'backlog ev/s':>12}  {'x of ' + str(one):>6}  {'live sent ev/s':>14}  {'live e2e ev/s':>13}  {'x of ' + str(one):>6}  rounds (backlog ev/s)"
    )
    for n in counts:
        each = ", ".join(f"{r.backlog_eps:,.0f}" for r in rounds if r.drainers == n)
        print(
            f"  {n:>2}  {backlog[n]:>12,.0f}  {ratio(backlog[n], backlog[one]):>6}  "
            f"{sent[n]:>14,.0f}  {live[n]:>13,.0f}  {ratio(live[n], live[one]):>6}  {each}"
        )
    print()
    print("CPU, % of one core (backlog: while the backlog drains; live: sending until all counted)")
    for r in rounds:
        print(f"  N={r.drainers} backlog: {_cpu(r.cpu)}")
        if r.live_cpu:
            print(f"  N={r.drainers} live:    {_cpu(r.live_cpu)}")
    print()
    print("CHECKS")
    for r in rounds:
        ok = r.caught_up and r.counted == r.accepted and not r.pending_after
        print(
            f"  N={r.drainers}: counted {r.counted:,} of {r.accepted:,} accepted, consumers pending "
            f"{r.pending_after}, events per drainer {r.per_drainer_events}, errors {r.errors or 'none'}: "
            f"{'OK' if ok else 'MISMATCH'}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(x) for x in args.drainers.split(",") if x.strip()]

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    stack_args = argparse.Namespace(
        tmp_dir=args.tmp_dir, gateway_workers=args.gateway_workers, keep=args.keep
    )
    rounds: list[Round] = []
    began = time.monotonic()
    try:
        for n in [n for _ in range(args.repeat) for n in counts]:
            os.environ["METER_PARTITIONS"] = str(n)  # the gateway and the drainers inherit it
            stack = Stack(stack_args)
            try:
                stack.start()
                rounds.append(asyncio.run(_round(stack, args, n, EventFactory(f"d{n}{os.urandom(3).hex()}"))))
            finally:
                stack.stop()
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    _print(rounds)
    print(f"\n(whole run {time.monotonic() - began:.0f} s on {os.cpu_count()} cores; 'other' = CPU used")
    print(" meanwhile by programs outside the benchmark: high values mean the figures are low)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
