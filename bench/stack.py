"""The processes of one benchmark run: NATS, PostgreSQL, the gateway and the drain child, and their CPU.

The gateway is launched as ``meter up`` launches it (:mod:`meter_platform.runtime.launch`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from report import say

from meter_platform.capture import jetstream
from meter_platform.config import STREAM_NAME
from meter_platform.runtime.launch import gateway_command, platform_env
from meter_platform.runtime.servers import Server, free_port, spawn, start_nats, start_postgres
from meter_platform.storage import db

try:  # psutil comes with the platform's dependencies; without it the CPU columns stay empty
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

#: The benchmark's entry point, which the drain child runs with ``--role drain``.
BENCH_SCRIPT = Path(__file__).resolve().with_name("ingest_bench.py")


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


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


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
    #: An admin key made in the stack's own database (rate limits high enough not to be measured).
    api_key: str = ""
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
        self.api_key = _make_api_key(self.pg.url)
        asyncio.run(_prepare_stream(self.nats.url))
        port = free_port()
        self.gateway_url = f"http://127.0.0.1:{port}"
        self.env = platform_env(
            self.nats.url,
            self.pg.url,
            self.tmp,
            METER_GATEWAY_HOST="127.0.0.1",
            METER_GATEWAY_PORT=str(port),
        )
        cmd = gateway_command("127.0.0.1", port, self.args.gateway_workers)
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
            str(BENCH_SCRIPT),
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

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header that sends the stack's API key."""
        return {"Authorization": f"Bearer {self.api_key}"}

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
        """Stop every process started (drain, gateway, then the servers) and delete the temp dir.

        A second Ctrl-C meanwhile is ignored, so the stop is never cut short and leaves nothing behind.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _stop_process(self.drain)
            _stop_process(self.gateway)
            for server in (self.pg, self.nats):
                if server is not None:
                    with contextlib.suppress(Exception):
                        server.stop()
            if self.tmp is not None and not self.args.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_async(coro: Any) -> Any:
    """Run a bench's coroutine on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _make_api_key(database_url: str) -> str:
    """An admin key in the bench's database, limits far above what one machine can send."""
    from meter_platform.access import create_key

    with db.connect(database_url) as conn:
        _, secret = create_key(conn, ["admin"], name="bench", events_per_second=1e9, requests_per_second=1e9)
        conn.commit()
    return secret


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
