"""Ingest benchmark: capture throughput of the gateway vs. JetStream direct, and end-to-end freshness.

Run with ``make bench`` (= ``.venv/bin/python bench/ingest_bench.py``) on a machine with nothing
running. The benchmark starts its own nats-server (JetStream, file store, fsync on every write) and
PostgreSQL in a fresh temporary folder, migrates, starts the gateway with uvicorn in its own process,
measures, prints a table, and stops and deletes everything again (also on Ctrl-C). It never asserts
on speed; it only prints numbers. See ``bench/README.md`` for what each figure means.

Phases:

* ``capture``: 64 concurrent clients (``--concurrency``) POST realistic ``api_call`` events to the
  gateway, as JSON arrays of ``--batch-size`` events and as single events; then the same shapes are
  published straight to JetStream with nats-py ``publish_async`` (the same number of publishes in
  flight). Events/s, requests/s, request latency and the CPU each process used are reported.
* ``e2e``: the pipeline's ``drain()`` runs in its own process while the gateway receives a stream of
  batches: first as fast as the clients can send ("max"), then paced at a steady rate ("steady").
  Reported: events/s that became visible in ``usage_minute_aggregates``, and the freshness of probe
  events (time from the gateway's 202 until the event is stored and aggregated), then the ledger of
  ``GET /v1/ingest/status`` balanced against the events the gateway accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from meter_platform.capture import jetstream
from meter_platform.config import EVENTS_SUBJECT_PREFIX, STREAM_NAME
from meter_platform.runtime.servers import (
    Server,
    free_port,
    nats_server_binary,
    spawn,
    start_nats,
    start_postgres,
)
from meter_platform.storage import db

try:  # psutil comes with the platform's dependencies; without it the CPU columns stay empty
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

_JSON = {"content-type": "application/json"}

# --- realistic api_call events ----------------------------------------------------------------------

# (endpoint, method) pairs a customer's integration calls; each customer uses a handful of them.
_CALLS = [
    ("/v1/users", "GET"),
    ("/v1/users", "POST"),
    ("/v1/orders", "GET"),
    ("/v1/orders", "POST"),
    ("/v1/orders/{id}", "PATCH"),
    ("/v1/search", "GET"),
    ("/v1/payments", "POST"),
    ("/v1/files/{id}", "PUT"),
    ("/v1/files/{id}", "DELETE"),
    ("/v1/reports", "GET"),
]
_REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1"]
CUSTOMERS = 1000


def utc_stamp(dt: datetime) -> str:
    """RFC 3339 with microseconds and Z, as senders usually stamp their events."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventFactory:
    """Unique, valid ``api_call`` events like the contract's example (1000 customers, 10 calls, 5 regions).

    Bodies are built from string templates, not dicts and a JSON encoder: the load generator shares
    the CPU with what it measures, so it has to be cheap (a few µs an event).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.n = 0
        self._seconds: dict[int, str] = {}

    def _stamp(self, us: int) -> str:
        sec, frac = divmod(us, 1_000_000)
        head = self._seconds.get(sec)
        if head is None:
            if len(self._seconds) > 8:
                self._seconds.clear()
            head = self._seconds[sec] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{head}.{frac:06d}Z"

    def body(self, count: int, probe_customer: str | None = None) -> tuple[bytes, str]:
        """JSON of ``count`` new events (an array, or one object when ``count`` is 1) and the first id.

        Each event has its own time, as an SDK stamps them when they happen (the last few ms); the
        first one gets ``probe_customer`` as its customer when given.
        """
        now = time.time_ns() // 1000
        items = []
        first = f"{self.prefix}-{self.n:010d}"
        for i in range(count):
            n = self.n
            self.n += 1
            mix = (n * 2654435761) & 0xFFFFFFFF
            c = mix % CUSTOMERS
            customer = probe_customer if (i == 0 and probe_customer) else f"cust-{c:04d}"
            endpoint, method = _CALLS[(c + (mix >> 12) % 4) % len(_CALLS)]
            items.append(
                f'{{"id":"{self.prefix}-{n:010d}","event_type":"api_call","customer_id":"{customer}",'
                f'"timestamp":"{self._stamp(now - (count - i) * 137)}","properties":{{"endpoint":"{endpoint}",'
                f'"method":"{method}","region":"{_REGIONS[c % len(_REGIONS)]}",'
                f'"response_time_ms":{5 + (mix >> 8) % 400}.25,"bytes_transferred":{200 + (mix >> 4) % 65_000}}},'
                '"metadata":{"sdk":"bench/1.0"}}'
            )
        text = items[0] if count == 1 else "[" + ",".join(items) + "]"
        return text.encode(), first


# --- processes ----------------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL to the process group it leads (its own session) if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and all its descendants (live ones, and reaped ones)."""
    if psutil is None:
        return float("nan")
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle, since boot."""
    if psutil is None:
        return float("nan")
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def own_cpu_seconds() -> float:
    """This process's CPU (the load generator), without its children."""
    t = os.times()
    return t.user + t.system


@dataclass
class Stack:
    """The servers and the gateway of one benchmark run, in a temp dir deleted at the end."""

    args: argparse.Namespace
    tmp: Path | None = None
    nats: Server | None = None
    pg: Server | None = None
    gateway: subprocess.Popen | None = None
    drain: subprocess.Popen | None = None
    gateway_url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        """Start NATS, PostgreSQL and the gateway; migrate; wait until the gateway is ready."""
        base = self.args.tmp_dir or None
        self.tmp = Path(tempfile.mkdtemp(prefix="meter-bench-", dir=base))
        say(f"temp dir {self.tmp}")
        self.nats = start_nats(self.tmp / "nats")
        self.pg = start_postgres(self.tmp / "pg" / "data", databases=("meter",))
        db.migrate(self.pg.url)
        _activate_meters(self.pg.url)
        asyncio.run(_prepare_stream(self.nats.url))
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "METER_NATS_URL": self.nats.url,
            "METER_DATABASE_URL": self.pg.url,
            "METER_GATEWAY_HOST": "127.0.0.1",
            "METER_GATEWAY_PORT": str(port),
            "METER_HOME": str(self.tmp),
        }
        uvicorn = Path(sys.executable).parent / "uvicorn"
        cmd = [
            str(uvicorn),
            "--factory",
            "ingest_gateway.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--workers",
            str(self.args.gateway_workers),
        ]
        self.gateway = spawn(cmd, self.tmp / "gateway.log", env=self.env)
        deadline = time.monotonic() + 60
        while True:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited; its log:\n{(self.tmp / 'gateway.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.gateway_url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready within 60 s")
            time.sleep(0.2)
        if self.args.gateway_workers > 1:
            time.sleep(1.0)  # the other workers finish their start-up a moment after the first answers
        say(
            f"gateway {self.gateway_url} ({self.args.gateway_workers} worker(s)), NATS {self.nats.url}, "
            f"PostgreSQL {self.pg.url}"
        )

    def start_drain(self, batch_size: int, stats_file: Path) -> None:
        """The pipeline's drain() in its own process (see ``--role drain``)."""
        assert self.nats and self.pg and self.tmp
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            "drain",
            "--nats-url",
            self.nats.url,
            "--database-url",
            self.pg.url,
            "--drain-batch",
            str(batch_size),
            "--stats-file",
            str(stats_file),
        ]
        self.drain = spawn(cmd, self.tmp / "drain.log", env=self.env)

    def pids(self) -> dict[str, int]:
        """The processes whose CPU is reported."""
        out = {}
        if self.gateway and self.gateway.poll() is None:
            out["gateway"] = self.gateway.pid
        if self.nats:
            out["nats"] = self.nats.process.pid
        if self.pg:
            out["postgres"] = self.pg.process.pid
        if self.drain and self.drain.poll() is None:
            out["drain"] = self.drain.pid
        return out

    def stop(self) -> None:
        """Stop every process started (drain, gateway, then the servers) and delete the temp dir."""
        _stop_process(self.drain)
        _stop_process(self.gateway)
        for server in (self.pg, self.nats):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.tmp is not None and not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _activate_meters(database_url: str) -> None:
    """Make the catalog's meters active (the pipeline aggregates with the definitions in the database)."""
    try:
        from meter_platform.meters.rebuild import sync_meters
    except ImportError:  # a version without meter definitions aggregates with the catalog directly
        return
    from meter_platform.catalog import load_catalog
    from meter_platform.config import load_settings

    with db.connect(database_url, autocommit=True) as conn:
        sync_meters(conn, load_catalog(load_settings().catalog_dir))


async def _prepare_stream(url: str) -> None:
    nc = await jetstream.connect(url, name="bench-setup")
    try:
        await jetstream.ensure_stream_and_consumer(nc.jetstream())
    finally:
        await nc.close()


async def purge_stream(url: str) -> None:
    """Empty the stream between capture runs (nothing drains during capture)."""
    nc = await jetstream.connect(url, name="bench-purge")
    try:
        await nc.jetstream().purge_stream(STREAM_NAME)
    finally:
        await nc.close()


class CpuMeter:
    """CPU used by each process between start() and stop(), as % of one core."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def start(self) -> None:
        self.pids = self.stack.pids()
        self.t0 = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.client0 = own_cpu_seconds()
        self.busy0 = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        out = {name: 100 * (cpu_seconds(pid) - self.before[name]) / wall for name, pid in self.pids.items()}
        out["client"] = 100 * (own_cpu_seconds() - self.client0) / wall
        # Everything else the machine did meanwhile: other programs, the kernel's own threads.
        out["other"] = max(0.0, 100 * (machine_busy_seconds() - self.busy0) / wall - sum(out.values()))
        return out


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One capture measurement."""

    name: str
    events: int = 0
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Window:
    """Which completions count: duration mode skips a warm-up and stops at a deadline; events mode
    counts everything from the first send until ``events`` are acknowledged."""

    def __init__(self, duration: float, warmup: float, events: int | None):
        self.events = events
        self.start = time.perf_counter()
        self.measure_from = self.start + (0 if events else warmup)
        self.deadline = None if events else self.measure_from + duration
        self.claimed = 0
        self.records: list[tuple[float, float, int]] = []  # (done, latency, events)

    def claim(self, n: int) -> bool:
        """May another request of ``n`` events be sent?"""
        if self.events is not None:
            if self.claimed >= self.events:
                return False
            self.claimed += n
            return True
        assert self.deadline is not None
        return time.perf_counter() < self.deadline

    def result(self, name: str) -> Result:
        if self.events is not None:
            counted = self.records
            seconds = (max(r[0] for r in counted) - self.start) if counted else 0.0
        else:
            assert self.deadline is not None
            counted = [r for r in self.records if self.measure_from <= r[0] <= self.deadline]
            seconds = self.deadline - self.measure_from
        return Result(name, sum(r[2] for r in counted), len(counted), seconds, [r[1] for r in counted])


def _count_error(errors: dict[str, int], key: str) -> None:
    errors[key] = errors.get(key, 0) + 1


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client.

    httpx's connection pool spends most of a core on bookkeeping with 64 connections (its pool scan is
    O(connections) per request): as a load generator it would measure itself, not the gateway. This
    client writes one request and reads one response with a Content-Length, nothing more.
    """

    #: uvicorn closes a keep-alive connection idle for 5 s; reopen before that rather than race it.
    MAX_IDLE = 2.0

    def __init__(self, url: str):
        self.hostport = url.split("://", 1)[1].rstrip("/")
        self.host = self.hostport
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        conn = cls(url)
        await conn._connect()
        return conn

    async def _connect(self) -> None:
        if self.writer is not None:
            self.writer.close()
        host, port = self.hostport.rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.last_used = time.monotonic()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request, return (status, body)."""
        if time.monotonic() - self.last_used > self.MAX_IDLE:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.writer.write(body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        else:
            raise RuntimeError(f"response without Content-Length: {raw[:200]!r}")
        data = await self.reader.readexactly(length) if length else b""
        self.last_used = time.monotonic()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LoadClient:
    """``concurrency`` connections to the gateway, one per worker (raw, or httpx with ``--client httpx``)."""

    def __init__(self, url: str, concurrency: int, kind: str):
        self.url, self.concurrency, self.kind = url, concurrency, kind
        self.raw: list[RawConnection] = []
        self.httpx: httpx.AsyncClient | None = None

    async def __aenter__(self) -> LoadClient:
        if self.kind == "httpx":
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            self.httpx = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=httpx.Timeout(60.0))
            await asyncio.gather(*(self.httpx.get("/healthz") for _ in range(self.concurrency)))
        else:
            self.raw = list(
                await asyncio.gather(*(RawConnection.open(self.url) for _ in range(self.concurrency)))
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.raw:
            conn.close()
        if self.httpx is not None:
            await self.httpx.aclose()

    async def post(self, worker: int, body: bytes) -> int:
        """POST /v1/events on the worker's connection; the status code."""
        if self.httpx is not None:
            return (await self.httpx.post("/v1/events", content=body, headers=_JSON)).status_code
        return (await self.raw[worker].request("POST", "/v1/events", body))[0]


async def capture_gateway(
    stack: Stack, args: argparse.Namespace, factory: EventFactory, batch: int
) -> Result:
    """``concurrency`` clients POST /v1/events as fast as the gateway answers."""
    errors: dict[str, int] = {}
    async with LoadClient(stack.gateway_url, args.concurrency, args.client) as client:
        cpu = CpuMeter(stack)
        cpu.start()
        win = Window(args.duration, args.warmup, args.events)

        async def worker(w: int) -> None:
            while win.claim(batch):
                body, _ = factory.body(batch)
                t0 = time.perf_counter()
                try:
                    status = await client.post(w, body)
                except (OSError, httpx.HTTPError, asyncio.IncompleteReadError) as exc:
                    _count_error(errors, type(exc).__name__)
                    return
                t1 = time.perf_counter()
                if status == 202:
                    win.records.append((t1, t1 - t0, batch))
                else:
                    _count_error(errors, str(status))

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        shape = f"batch of {batch}" if batch > 1 else "single event"
        result = win.result(f"gateway, {shape}")
        result.cpu = cpu.stop()
    result.errors = errors
    return result


async def capture_direct(stack: Stack, args: argparse.Namespace, factory: EventFactory, batch: int) -> Result:
    """The same events published straight to JetStream, ``concurrency`` publishes in flight."""
    assert stack.nats is not None
    errors: dict[str, int] = {}
    nc = await jetstream.connect(stack.nats.url, name="bench-direct")
    try:
        js = nc.jetstream(publish_async_max_pending=args.concurrency)
        subject = f"{EVENTS_SUBJECT_PREFIX}.api_call"
        await js.publish(subject, factory.body(1)[0])  # warm: inbox, subscription
        await purge_stream(stack.nats.url)
        cpu = CpuMeter(stack)
        cpu.start()
        win = Window(args.duration, args.warmup, args.events)

        def done(fut: asyncio.Future, *, t0: float) -> None:
            t1 = time.perf_counter()
            if fut.cancelled():
                _count_error(errors, "cancelled")
            elif fut.exception() is not None:
                _count_error(errors, type(fut.exception()).__name__)
            else:
                win.records.append((t1, t1 - t0, batch))

        k = 0
        while win.claim(batch):
            payload, first_id = factory.body(batch)
            msg_id = f"{factory.prefix}-m{k}" if batch > 1 else first_id
            k += 1
            t0 = time.perf_counter()
            fut = await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
            fut.add_done_callback(functools.partial(done, t0=t0))
        await asyncio.wait_for(js.publish_async_completed(), 60)
        shape = f"batch of {batch}" if batch > 1 else "single event"
        result = win.result(f"direct JetStream, {shape}")
        result.cpu = cpu.stop()
    finally:
        await nc.close()
    result.errors = errors
    return result


# --- end to end ---------------------------------------------------------------------------------


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
    batch = args.batch_size
    vis = Visibility(stack.pg.url, args.poll_interval)
    stop_polling = asyncio.Event()
    accepted = [0]
    backlog = [0]

    def on_count(counted: int) -> None:
        backlog[0] = max(backlog[0], baseline + accepted[0] - counted)

    drain_before = _read_drain_stats(stats_file)
    poller = asyncio.create_task(vis.run(stop_polling, on_count))
    async with LoadClient(stack.gateway_url, args.concurrency, args.client) as client:
        cpu = CpuMeter(stack)
        cpu.start()
        start = time.perf_counter()
        deadline = None if args.events else start + args.e2e_duration
        interval = batch / rate if rate else 0.0
        next_probe = [start]
        counter = [0]

        async def worker(w: int) -> None:
            while True:
                k = counter[0]
                if (args.events and k * batch >= args.events) or (
                    deadline and time.perf_counter() >= deadline
                ):
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
                    _count_error(res.errors, type(exc).__name__)
                    return
                t1 = time.perf_counter()
                if status != 202:
                    _count_error(res.errors, str(status))
                    continue
                accepted[0] += batch
                res.latencies.append(t1 - t0)
                if probe is not None:
                    vis.outstanding[first_id] = t1
                    res.probes.append((first_id, probe))

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        sent_at = time.perf_counter()
        res.accepted = accepted[0]
        res.send_seconds = sent_at - start
        counted_at_send_end = await _count_now(stack.pg.url)
        res.visible_during_send = counted_at_send_end - baseline
        # Wait for the pipeline to catch up: every accepted event counted by the meter.
        wait_until = time.perf_counter() + args.catch_up_timeout
        while time.perf_counter() < wait_until:
            if vis.counted >= baseline + res.accepted and not vis.outstanding:
                res.caught_up = True
                break
            if stack.drain is not None and stack.drain.poll() is not None:
                res.drain_exit = stack.drain.returncode
                break
            await asyncio.sleep(args.poll_interval)
        res.total_seconds = time.perf_counter() - start
        res.visible_total = vis.counted - baseline
        res.cpu = cpu.stop()
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
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
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


# --- the drain child ----------------------------------------------------------------------------


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)


def drain_child(args: argparse.Namespace) -> int:
    """``--role drain``: run the pipeline's drain() until SIGTERM, timing the writer's batches."""
    from meter_platform.catalog import load_catalog
    from meter_platform.config import DrainSettings, load_settings
    from meter_platform.ingestion.drain import drain
    from meter_platform.ingestion.writer import BatchCounts, MicroBatchWriter

    stats = {"batches": 0, "messages": 0, "events": 0, "write_seconds": 0.0, "empty_fetches": 0}
    stats_file = Path(args.stats_file)
    original = MicroBatchWriter.write

    def timed_write(self, messages, run_id=None):
        if not messages:
            # nats-py's fetch() can return [] (a stale 408/404 status of an earlier pull); drain()
            # hands that to the writer, whose _commit() then fails on seqs[0] and ends the run.
            # Counted and reported; skipped here so the measurement goes on.
            stats["empty_fetches"] += 1
            _write_stats(stats_file, stats)
            return BatchCounts()
        t0 = time.perf_counter()
        counts = original(self, messages, run_id)
        stats["write_seconds"] += time.perf_counter() - t0
        stats["batches"] += 1
        stats["messages"] += len(messages)
        stats["events"] += counts.events
        _write_stats(stats_file, stats)
        return counts

    MicroBatchWriter.write = timed_write  # type: ignore[method-assign]
    catalog = load_catalog(load_settings().catalog_dir)
    settings = DrainSettings(batch_size=args.drain_batch, max_seconds=1e9, idle_seconds=1e9)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await drain(args.nats_url, args.database_url, catalog, settings, run_id="bench")

    asyncio.run(main())
    return 0


# --- report -------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


def _cpu(cpu: dict[str, float]) -> str:
    order = ("client", "gateway", "nats", "postgres", "drain", "other")
    return " ".join(f"{k}={cpu[k]:.0f}%" for k in order if k in cpu and cpu[k] == cpu[k])


def machine_facts(stack: Stack) -> list[str]:
    facts = []
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts.append(f"CPUs: {os.cpu_count()} ({usable} usable) {model}")
    facts.append(
        f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}"
    )
    nats_version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    facts.append(f"nats-server: {nats_version} (JetStream file store, sync_interval: always)")
    if stack.pg is not None:
        with db.connect(stack.pg.url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            facts.append(f"PostgreSQL {row[0] if row else '?'}")
    from importlib.metadata import version

    libs = ", ".join(
        f"{n} {version(n)}" for n in ("uvicorn", "starlette", "httpx", "nats-py", "msgspec", "psycopg")
    )
    facts.append(f"libraries: {libs}")
    if stack.tmp is not None:
        facts.append(
            f"temp dir {stack.tmp.parent} on {_filesystem(stack.tmp)}, fsync of 4 KiB: "
            f"p50 {_ms(_fsync_p50(stack.tmp))} ms"
        )
    return facts


def _filesystem(path: Path) -> str:
    best, fstype, dev = "", "?", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, dev, fstype = parts[1], parts[0], parts[2]
    return f"{fstype} ({dev})"


def _fsync_p50(directory: Path) -> float:
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(50):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return pct(times, 50)


def print_capture(results: list[Result], args: argparse.Namespace) -> None:
    print()
    print(
        f"CAPTURE  ({args.concurrency} concurrent clients/publishes in flight; "
        + (
            f"{args.events} events each"
            if args.events
            else f"{args.duration:.0f} s each after {args.warmup:.0f} s warm-up"
        )
        + ")"
    )
    head = (
        f"{'path, shape':34} {'events/s':>10} {'req|msg/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7}  CPU (% of one core)"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        errors = sum(r.errors.values())
        print(
            f"{r.name:34} {r.eps:10,.0f} {r.rps:10,.0f} {_ms(pct(r.latencies, 50)):>8} "
            f"{_ms(pct(r.latencies, 95)):>8} {_ms(pct(r.latencies, 99)):>8} {errors:>7}  {_cpu(r.cpu)}"
        )
        if r.errors:
            print(f"{'':34} errors: {r.errors}")
    by_name = {r.name: r for r in results}
    for shape in (f"batch of {args.batch_size}", "single event"):
        gw, direct = by_name.get(f"gateway, {shape}"), by_name.get(f"direct JetStream, {shape}")
        if gw and direct and direct.eps:
            print(f"ratio gateway / direct, {shape}: {gw.eps / direct.eps:.2f}")


def print_e2e(stages: list[E2EResult], args: argparse.Namespace) -> None:
    print()
    print(
        f"END TO END  (gateway -> JetStream -> drain() in its own process -> PostgreSQL; batches of "
        f"{args.batch_size}, {args.concurrency} clients, drain batch {args.drain_batch} messages)"
    )
    head = (
        f"{'stage':22} {'sent ev/s':>10} {'agg ev/s':>10} {'e2e ev/s':>10} {'max backlog':>12} "
        f"{'fresh p50':>10} {'fresh p95':>10} {'fresh max':>10} {'POST p50':>9} {'POST p99':>9}"
    )
    print(head)
    print("-" * len(head))
    for s in stages:
        target = f" @{s.target_rate:,.0f}/s" if s.target_rate else ""
        print(
            f"{(s.name + target):22} {s.send_eps:10,.0f} {s.visible_eps_during_send:10,.0f} "
            f"{(f'{s.e2e_eps:,.0f}' if s.caught_up else 'not caught up'):>10} {s.max_backlog:12,} "
            f"{_ms(pct(s.freshness, 50)):>10} {_ms(pct(s.freshness, 95)):>10} "
            f"{_ms(max(s.freshness) if s.freshness else float('nan')):>10} "
            f"{_ms(pct(s.latencies, 50)):>9} {_ms(pct(s.latencies, 99)):>9}"
        )
    for s in stages:
        d = s.drain
        per_batch = (
            f"{d.get('events', 0) / d['batches']:.0f} events/batch" if d.get("batches") else "no batches"
        )
        write_rate = d.get("events", 0) / d["write_seconds"] if d.get("write_seconds") else 0.0
        print(
            f"  {s.name}: {s.accepted:,} events accepted in {s.send_seconds:.1f} s, all visible after "
            f"{s.total_seconds:.1f} s; {len(s.freshness)} probes ({s.probes_lost} not seen); drain: "
            f"{d.get('batches', 0):.0f} batches, {per_batch}, writer busy {d.get('write_seconds', 0):.1f} s "
            f"({write_rate:,.0f} events/s while writing); CPU {_cpu(s.cpu)}"
            + (f"; errors {s.errors}" if s.errors else "")
        )
        if d.get("empty_fetches"):
            print(
                f"  {s.name}: WARNING drain() passed {d['empty_fetches']:.0f} empty fetch(es) to the writer, "
                "which fails on them (pipeline bug); the benchmark's drain process skipped them"
            )
        if s.drain_exit is not None:
            print(
                f"  {s.name}: ERROR the drain process exited with code {s.drain_exit}; see drain.log (--keep)"
            )


# --- main ---------------------------------------------------------------------------------------


async def run_capture(stack: Stack, args: argparse.Namespace, factory: EventFactory) -> list[Result]:
    assert stack.nats is not None
    results = []
    plan = [("gateway", args.batch_size), ("direct", args.batch_size), ("gateway", 1), ("direct", 1)]
    for path, batch in plan:
        await purge_stream(stack.nats.url)
        run = capture_gateway if path == "gateway" else capture_direct
        result = await run(stack, args, factory, batch)
        say(
            f"{result.name}: {result.eps:,.0f} events/s, {result.rps:,.0f} req/s, p50 "
            f"{_ms(pct(result.latencies, 50))} ms, p99 {_ms(pct(result.latencies, 99))} ms, "
            f"CPU {_cpu(result.cpu)}"
        )
        results.append(result)
    await purge_stream(stack.nats.url)  # the end-to-end phase starts from an empty stream
    return results


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
            f"{_ms(pct(first.freshness, 50))} ms"
        )
        basis = first.e2e_eps or (first.visible_total / first.total_seconds if first.total_seconds else 0.0)
        rate = max(args.batch_size, round(basis * args.steady_fraction, -2))
    else:
        rate = args.e2e_rate
    steady = await e2e_stage(stack, args, factory, "steady", rate, baseline, stats_file)
    stages.append(steady)
    say(
        f"e2e steady: sent {steady.send_eps:,.0f} ev/s, freshness p50 {_ms(pct(steady.freshness, 50))} ms, "
        f"p95 {_ms(pct(steady.freshness, 95))} ms"
    )
    accepted = sum(s.accepted for s in stages)
    every = [p for s in stages for p in s.probes]
    probes = every[:: max(1, len(every) // 20)]
    checks = await verify(stack, probes, started, accepted)
    return stages, checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--only", choices=("capture", "e2e"), help="run one phase only (default: both)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per capture run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before each capture measurement")
    p.add_argument("--events", type=int, help="send this many events per run instead of a fixed duration")
    p.add_argument(
        "--concurrency", type=int, default=64, help="concurrent HTTP clients / publishes in flight"
    )
    p.add_argument("--batch-size", type=int, default=100, help="events per JSON-array request / message")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP load generator: a minimal keep-alive client, or httpx.AsyncClient",
    )
    p.add_argument("--gateway-workers", type=int, default=1, help="uvicorn worker processes of the gateway")
    p.add_argument("--e2e-duration", type=float, default=20.0, help="seconds of sending per end-to-end stage")
    p.add_argument(
        "--e2e-rate",
        type=float,
        help="events/s of the steady stage (default: --steady-fraction of the max stage's rate; "
        "when given, the max stage is skipped)",
    )
    p.add_argument(
        "--steady-fraction", type=float, default=0.5, help="steady rate as a fraction of the max stage's"
    )
    p.add_argument(
        "--drain-batch", type=int, default=500, help="messages per fetch of drain() (the job's default)"
    )
    p.add_argument("--probe-interval", type=float, default=0.1, help="seconds between freshness probes")
    p.add_argument("--poll-interval", type=float, default=0.02, help="seconds between visibility polls")
    p.add_argument(
        "--catch-up-timeout", type=float, default=90.0, help="max seconds to wait for the pipeline"
    )
    p.add_argument(
        "--tmp-dir", help="parent folder of the temp dir (default: the system's); its disk's fsync matters"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    # The drain child (internal).
    p.add_argument("--role", choices=("bench", "drain"), default="bench", help=argparse.SUPPRESS)
    p.add_argument("--nats-url", help=argparse.SUPPRESS)
    p.add_argument("--database-url", help=argparse.SUPPRESS)
    p.add_argument("--stats-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "drain":
        return drain_child(args)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    stack = Stack(args)
    began = time.monotonic()
    factory = EventFactory(f"b{os.urandom(4).hex()}")
    capture: list[Result] = []
    stages: list[E2EResult] = []
    checks: list[str] = []
    try:
        stack.start()
        facts = machine_facts(stack)
        if args.only in (None, "capture"):
            capture = _run(run_capture(stack, args, factory))
        if args.only in (None, "e2e"):
            stages, checks = _run(run_e2e(stack, args, factory))
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print()
    print("MACHINE")
    for line in facts:
        print(f"  {line}")
    if capture:
        print_capture(capture, args)
    if stages:
        print_e2e(stages, args)
        print()
        print("CHECKS")
        for line in checks:
            print(f"  {line}")
    print(
        f"\n(whole run {time.monotonic() - began:.0f} s; 'other' = CPU used meanwhile by programs outside "
        "the benchmark, as % of one core: high values mean the figures are low)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
