"""Chaos suite: kill -9 the platform's processes under load, then count what was acked against what is stored.

`make chaos` (every scenario, several kills each) or `make chaos-short` (each scenario once, shorter):

    .venv/bin/python tests/chaos/run.py [--short] [--scenarios nats,postgres,...] [--list]

Each platform is a real `meter up` in its own process group, with METER_HOME in a temporary directory,
free ports, and short METER_RUN_STALE_SECONDS / METER_RUN_START_GRACE_SECONDS. A sender posts batches of
events with its own ids (~1,000 events/s) and retries a 503 / 429 / connection error / timeout with the
same ids after Retry-After or a backoff. Faults are injected at random moments; nothing else touches the
platform. Afterwards the suite waits for the backlog to drain and prints one row per scenario.

Not collected by pytest (pyproject's addopts ignore tests/chaos). Processes are found by walking
/proc from the `meter up` pid (and by a marker variable in their environment), never by name alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from meter_platform.runtime.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
METER = ROOT / ".venv" / "bin" / "meter"

MARK = "METER_CHAOS_TAG"


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes (by /proc, no psutil)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def tagged(tag: str) -> list[int]:
    """Every live process whose environment carries our marker (also orphans re-parented to init)."""
    pids = []
    needle = f"{MARK}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------- the platform under test


@dataclass
class Platform:
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    gateway_port: int = field(default_factory=free_port)
    dagster_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    runtime: dict = field(default_factory=dict)

    def start(self, timeout: float = 180) -> None:
        (self.home / ".meter").mkdir(parents=True, exist_ok=True)
        (self.home / ".meter" / "runtime.json").unlink(missing_ok=True)
        env = {
            **os.environ,
            "METER_HOME": str(self.home),
            "METER_GATEWAY_PORT": str(self.gateway_port),
            "METER_DAGSTER_PORT": str(self.dagster_port),
            "METER_RUN_STALE_SECONDS": "20",
            "METER_RUN_START_GRACE_SECONDS": "40",
            "DAGSTER_HOME": str(ROOT / "dagster_home"),
            MARK: self.tag,
            **self.extra_env,
        }
        log = open(self.home / "meter-up.log", "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(
            [str(METER), "up"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        path = self.home / ".meter" / "runtime.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"meter up exited {self.proc.returncode}; see {self.home / 'meter-up.log'}"
                )
            if path.exists():
                try:
                    self.runtime = json.loads(path.read_text())
                    return
                except ValueError:
                    pass
            time.sleep(0.5)
        raise RuntimeError("meter up did not write runtime.json in time")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def find(self, pred: Callable[[int, str], bool]) -> list[int]:
        return [p for p in self.pids() if pred(p, cmdline(p))]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        for pid in tagged(self.tag):  # whatever is left (only processes carrying our marker)
            kill(pid)
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def kill_tree(self) -> int:
        """kill -9 meter up and every process it started (the whole tree at once), as a power cut would."""
        pids = [self.proc.pid, *self.pids()] if self.proc else []
        for pid in pids:
            kill(pid, signal.SIGSTOP)  # freeze first, so nobody restarts anybody meanwhile
        for pid in [*pids, *tagged(self.tag)]:
            kill(pid)
        if self.proc:
            self.proc.wait(10)
        time.sleep(1)
        return len(pids)


def api_key(home: Path) -> str | None:
    path = home / ".meter" / "api-key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(home: Path) -> dict[str, str]:
    """The Authorization header with the platform's admin key, once `meter up` has written it."""
    key = api_key(home)
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------- the sender


@dataclass
class Ledger:
    acked: set[str] = field(default_factory=set)
    timed_out: set[str] = field(default_factory=set)  # a request with these ids timed out client-side
    sent: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)
    statuses: dict[str, int] = field(default_factory=dict)
    last_ack: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.statuses[what] = self.statuses.get(what, 0) + 1


class Sender:
    """Threads posting batches of api_call events; each batch is retried with the same ids until 202."""

    def __init__(
        self, platform: Platform, prefix: str, rate: float = 1000, batch: int = 50, threads: int = 2
    ):
        self.platform, self.prefix, self.batch = platform, prefix, batch
        self.interval = batch * threads / rate
        self.ledger = Ledger()
        self.stop_new = threading.Event()  # no new batches; pending ones still retried
        self.abandon = threading.Event()  # stop retrying too
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        self.n = 0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout: float) -> None:
        self.stop_new.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.abandon.set()
        for t in self.threads:
            t.join(15)

    def _events(self, worker: int, k: int) -> tuple[list[str], bytes]:
        ids = [f"{self.prefix}-{worker}-{k}-{j}" for j in range(self.batch)]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        events = [
            {
                "id": i,
                "event_type": "api_call",
                "customer_id": f"{self.prefix}-c{j % 5}",
                "timestamp": now,
                "properties": {
                    "endpoint": "/v1/x",
                    "method": "GET",
                    "region": "eu",
                    "bytes_transferred": j + 1,
                },
            }
            for j, i in enumerate(ids)
        ]
        return ids, json.dumps(events).encode()

    def _post(self, client: httpx.Client, body: bytes) -> tuple[str, float]:
        """One attempt: ('ok'|'retry'|'timeout', seconds to wait before retrying)."""
        headers = {"Content-Type": "application/json", **auth_headers(self.platform.home)}
        url = f"http://127.0.0.1:{self.platform.gateway_port}/v1/events"
        try:
            r = client.post(url, content=body, headers=headers)
        except httpx.TimeoutException:
            self.ledger.count("timeout")
            return "timeout", 1.0
        except httpx.TransportError:
            self.ledger.count("conn-error")
            return "retry", 1.0
        self.ledger.count(str(r.status_code))
        if r.status_code == 202:
            return "ok", 0
        if r.status_code in (429, 503, 502, 504):
            try:
                return "retry", float(r.headers.get("Retry-After", 1))
            except ValueError:
                return "retry", 1.0
        raise RuntimeError(f"unexpected answer {r.status_code}: {r.text[:300]}")

    def _loop(self, worker: int) -> None:
        client = httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0))
        k = 0
        next_at = time.monotonic()
        while not self.stop_new.is_set():
            ids, body = self._events(worker, k)
            k += 1
            with self.ledger.lock:
                self.ledger.sent.update(ids)
            backoff = 0.5
            while True:
                outcome, wait = self._post(client, body)
                if outcome == "ok":
                    with self.ledger.lock:
                        self.ledger.acked.update(ids)
                        self.ledger.last_ack = time.monotonic()
                    break
                if outcome == "timeout":
                    with self.ledger.lock:
                        self.ledger.timed_out.update(ids)
                if self.abandon.is_set():
                    with self.ledger.lock:
                        self.ledger.given_up.update(ids)
                    return
                time.sleep(max(wait, backoff) * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 5)
            next_at += self.interval
            time.sleep(max(0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.interval)
        client.close()


# ---------------------------------------------------------------- counting


def q(url: str, sql: str, params: object = None) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def stored_ids(url: str, prefix: str) -> set[str]:
    return {r[0] for r in q(url, "SELECT id FROM usage_events WHERE id LIKE %s", (prefix + "-%",))}


def backlog(platform: Platform) -> int | None:
    """consumer.uncounted of /v1/ingest/status (messages not yet in the ledger); None if unknown."""
    headers = auth_headers(platform.home)
    try:
        r = httpx.get(
            f"http://127.0.0.1:{platform.gateway_port}/v1/ingest/status", headers=headers, timeout=5
        )
        return r.json().get("consumer", {}).get("uncounted")
    except Exception:
        return None


def wait_drained(platform: Platform, sender: Sender, timeout: float) -> float | None:
    """Seconds until every acked id is stored and the backlog is 0 (None on timeout)."""
    t0 = time.monotonic()
    url = platform.runtime["database_url"]
    while time.monotonic() - t0 < timeout:
        try:
            missing = len(sender.ledger.acked - stored_ids(url, sender.prefix))
        except Exception:
            missing = -1
        if missing == 0 and backlog(platform) == 0:
            return time.monotonic() - t0
        time.sleep(2)
    return None


def wait_recovered(platform: Platform, sender: Sender, since: float, min_seconds: float) -> float | None:
    """Seconds from a fault until every id acked before it is stored and a request was acked after it
    (polled while the load goes on for at least ``min_seconds``); None if not within 300 s."""
    with sender.ledger.lock:
        before = set(sender.ledger.acked)
    url = platform.runtime.get("database_url", "")
    recovered = None
    while time.monotonic() - since < 300:
        if recovered is None and sender.ledger.last_ack > since:
            try:
                if not before - stored_ids(url, sender.prefix):
                    recovered = time.monotonic() - since
            except Exception:
                pass
        if recovered is not None and time.monotonic() - since >= min_seconds:
            return recovered
        time.sleep(1)
    return recovered


def usage_total(platform: Platform, meter: str, customer: str) -> float | None:
    today = datetime.now(UTC).date()
    params = {
        "from": (today - timedelta(days=2)).isoformat() + "T00:00:00Z",
        "to": (today + timedelta(days=2)).isoformat() + "T00:00:00Z",
        "window": "day",
        "customer_id": customer,
    }
    headers = auth_headers(platform.home)
    try:
        r = httpx.get(
            f"http://127.0.0.1:{platform.gateway_port}/v1/meters/{meter}/usage",
            params=params,
            headers=headers,
            timeout=10,
        )
        r.raise_for_status()
        return sum(float(row["value"] or 0) for row in r.json()["data"])
    except Exception as exc:
        say(f"usage API {meter}/{customer}: {exc}")
        return None


@dataclass
class Row:
    name: str
    faults: int = 0
    acked: int = 0
    stored: int = 0
    missing: int = 0
    doubled: int = 0
    unacked_stored: int = 0
    unacked_stored_timed_out: int = 0
    ledger_gaps: int | None = None
    agg_mismatch: int = 0
    api_mismatch: int = 0
    recovery: float | None = None
    not_injected: int = 0
    note: str = ""

    def ok(self) -> bool:
        return (
            self.missing == 0
            and self.doubled == 0
            and self.agg_mismatch == 0
            and self.api_mismatch == 0
            and (self.unacked_stored == self.unacked_stored_timed_out)
            and not self.ledger_gaps
            and self.recovery is not None
            and self.not_injected == 0
        )


def count(platform: Platform, sender: Sender, row: Row) -> None:
    url = platform.runtime["database_url"]
    led = sender.ledger
    stored = stored_ids(url, sender.prefix)
    row.acked, row.stored = len(led.acked), len(stored)
    row.missing = len(led.acked - stored)
    unacked = stored - led.acked
    row.unacked_stored = len(unacked)
    row.unacked_stored_timed_out = len(unacked & (led.timed_out | led.given_up))
    # Doubling: the per-meter aggregates against a recount of the raw events, per customer.
    like = sender.prefix + "-%"
    raw = dict(
        (r[0], (r[1], r[2]))
        for r in q(
            url,
            "SELECT customer_id, count(*), sum((properties->>'bytes_transferred')::numeric) FROM usage_events "
            "WHERE customer_id LIKE %s AND event_type = 'api_call' GROUP BY 1",
            (like,),
        )
    )
    agg_calls = dict(
        q(
            url,
            "SELECT customer_id, sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls' "
            "AND customer_id LIKE %s GROUP BY 1",
            (like,),
        )
    )
    agg_bytes = dict(
        q(
            url,
            "SELECT customer_id, sum(value_sum) FROM usage_minute_aggregates "
            "WHERE meter_slug = 'bytes_transferred' AND customer_id LIKE %s GROUP BY 1",
            (like,),
        )
    )
    for cust in set(raw) | set(agg_calls) | set(agg_bytes):
        n, b = raw.get(cust, (0, 0))
        calls, byts = agg_calls.get(cust, 0), agg_bytes.get(cust, 0)
        if calls != n or byts != b:
            row.agg_mismatch += 1
            say(f"aggregate mismatch {cust}: raw {n} events / {b} bytes, aggregates {calls} / {byts}")
        if calls > n:
            row.doubled += int(calls - n)
        for meter, want in (("api_calls", n), ("bytes_transferred", b)):
            got = usage_total(platform, meter, cust)
            if got is None or abs(got - float(want)) > 1e-6:
                row.api_mismatch += 1
                say(f"usage API mismatch {meter}/{cust}: API {got}, raw {want}")
    # Ledger continuity: in the current stream incarnation every sequence from the first to the last
    # is in ingest_messages exactly once (PK), and the stream is empty, so no gap may remain.
    gaps = q(
        url,
        "SELECT max(stream_seq) - min(stream_seq) + 1 - count(*) FROM ingest_messages "
        "WHERE stream_created = (SELECT max(stream_created) FROM ingest_messages)",
    )
    row.ledger_gaps = int(gaps[0][0] or 0)
    # The ledger's own balance for our messages is not separable by prefix; usage_events' stream_seq must
    # point at a ledger row.
    orphans = q(
        url,
        "SELECT count(*) FROM usage_events e WHERE e.id LIKE %s AND NOT EXISTS "
        "(SELECT 1 FROM ingest_messages m WHERE m.stream_seq = e.stream_seq)",
        (sender.prefix + "-%",),
    )[0][0]
    if orphans:
        row.note += f" {orphans} stored events without a ledger row;"


# ---------------------------------------------------------------- faults


def _is_postmaster(pid: int, cmd: str, platform: Platform) -> bool:
    return "postgres" in cmd.split(" ")[0] and " -D " in f" {cmd} "


def kill_named(match: Callable[[int, str], bool], what: str) -> Callable[[Platform], str]:
    def fault(platform: Platform) -> str:
        pids = platform.find(match)
        if not pids:
            return f"no {what} found"
        pid = random.choice(pids)
        kill(pid)
        return f"kill -9 {what} {pid}"

    return fault


def postmaster(platform: Platform) -> list[int]:
    return platform.find(lambda p, c: "bin/postgres" in c.split(" ")[0] and " -D " in c)


def kill_postgres_mid_transaction(platform: Platform) -> str:
    """kill -9 a backend while it is inside an ingestion transaction (PostgreSQL then resets every backend)."""
    url = platform.runtime["database_url"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            rows = q(
                url,
                "SELECT pid, left(query, 60) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND xact_start IS NOT NULL "
                "AND state <> 'idle' "
                "AND (query ILIKE '%usage_events%' OR query ILIKE '%ingest_%' OR query ILIKE '%aggregates%')",
            )
        except Exception:
            rows = []
        if rows:
            pid, query = random.choice(rows)
            kill(pid)
            return f"kill -9 backend {pid} in transaction ({query!r})"
        time.sleep(0.05)
    pids = postmaster(platform)
    for pid in pids:
        kill(pid)
    return f"no backend caught in a transaction; kill -9 postmaster {pids}"


def kill_postmaster(platform: Platform) -> str:
    pids = postmaster(platform)
    for pid in pids:
        kill(pid)
    return f"kill -9 postmaster {pids}" if pids else "no postmaster found"


def sigstop_postgres(platform: Platform, seconds: float = 20) -> str:
    pids = platform.find(lambda p, c: "postgres" in c.split(" ")[0])
    for pid in pids:
        kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    for pid in pids:
        kill(pid, signal.SIGCONT)
    return f"SIGSTOP {len(pids)} postgres processes for {seconds:.0f} s"


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _run_workers(platform: Platform) -> list[int]:
    """Run workers: the code server (`dagster api grpc`) starts each run in a multiprocessing child."""
    return platform.find(lambda p, c: "spawn_main" in c and "api grpc" in cmdline(_ppid(p)))


def _step_processes(platform: Platform) -> list[int]:
    """The step processes (multiprocess executor): multiprocessing children of a run worker."""
    workers = set(_run_workers(platform))
    return platform.find(lambda p, c: "spawn_main" in c and _ppid(p) in workers)


def wait_for(pick: Callable[[Platform], list[int]], platform: Platform, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pick(platform)
        if pids:
            return pids
        time.sleep(0.5)
    return []


def kill_step(platform: Platform) -> str:
    pids = wait_for(_step_processes, platform)
    if not pids:
        return "no step process found"
    pid = random.choice(pids)
    c = cmdline(pid)
    kill(pid)
    return f"kill -9 step {pid} ({c[:60]})"


def kill_run_worker(platform: Platform) -> str:
    pids = wait_for(_run_workers, platform)
    if not pids:
        return "no run worker found"
    pid = random.choice(pids)
    kill(pid)
    return f"kill -9 run worker {pid}"


def kill_whole_tree(platform: Platform) -> str:
    n = platform.kill_tree()
    time.sleep(random.uniform(1, 5))
    platform.start()
    return f"kill -9 whole tree ({n} processes), meter up again"


def stop_drain(platform: Platform, seconds: float = 20) -> str:
    """Freeze the draining (step) processes so the small stream fills up and the gateway answers 503."""
    pids = wait_for(_step_processes, platform, 30) or _run_workers(platform)
    for pid in pids:
        kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    for pid in pids:
        kill(pid, signal.SIGCONT)
    return f"SIGSTOP {len(pids)} drain processes {seconds:.0f} s"


def fill_disk(platform: Platform, seconds: float = 15) -> str:
    """Fill the tmpfs under .meter/nats to the last byte, hold it full, then free the space again."""
    mount = platform.home / ".meter" / "nats"
    filler = mount / "chaos-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    try:
        for size in (1 << 20, 4096, 1):  # MiB chunks, then pages, then bytes: to the last byte
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    say(f"disk-full: wrote {written >> 20} MiB, {shutil.disk_usage(mount).free} bytes left")
    time.sleep(seconds)
    filler.unlink()
    return f"disk under NATS full for {seconds:.0f} s, then freed"


PID_MATCH: dict[str, Callable[[int, str], bool]] = {
    "nats": lambda p, c: "nats-server" in c,
    "gateway": lambda p, c: "uvicorn" in c,
    "daemon": lambda p, c: "dagster-daemon" in c and " run" in c,
}


@dataclass
class Scenario:
    name: str
    fault: Callable[[Platform], str]
    what: str
    env: dict[str, str] = field(default_factory=dict)  # needs its own platform with these settings
    tmpfs: bool = False
    repeats: int = 3


SCENARIOS = [
    Scenario("nats", kill_named(PID_MATCH["nats"], "nats-server"), "kill -9 nats-server"),
    Scenario("postgres", kill_postmaster, "kill -9 the PostgreSQL postmaster"),
    Scenario("postgres-txn", kill_postgres_mid_transaction, "kill -9 a PostgreSQL backend mid-transaction"),
    Scenario("step", kill_step, "kill -9 the draining step process"),
    Scenario("run-worker", kill_run_worker, "kill -9 the run worker (dagster api execute_run)"),
    Scenario("gateway", kill_named(PID_MATCH["gateway"], "gateway"), "kill -9 the gateway (uvicorn)"),
    Scenario("daemon", kill_named(PID_MATCH["daemon"], "dagster-daemon"), "kill -9 the Dagster daemon"),
    Scenario("tree", kill_whole_tree, "kill -9 the whole process tree, then meter up again"),
    Scenario("pg-sigstop", sigstop_postgres, "SIGSTOP PostgreSQL for 20 s", repeats=2),
    Scenario(
        "stream-full",
        stop_drain,
        "METER_STREAM_MAX_MSGS=40, drain frozen 20 s -> 503 + Retry-After",
        env={"METER_STREAM_MAX_MSGS": "40"},
        repeats=2,
    ),
    Scenario(
        "disk-full", fill_disk, "tmpfs under .meter/nats filled to the last byte", tmpfs=True, repeats=2
    ),
]


# ---------------------------------------------------------------- running


def mount_tmpfs(path: Path, size: str = "64m") -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        return (r.stderr or r.stdout).decode().strip() or f"mount exited {r.returncode}"
    return None


def run_scenario(sc: Scenario, platform: Platform, short: bool) -> Row:
    row = Row(sc.name)
    prefix = f"chaos-{sc.name}-{uuid.uuid4().hex[:6]}"
    sender = Sender(platform, prefix)
    repeats = 1 if short else sc.repeats
    warm, gap = (10, 15) if short else (20, 30)
    sender.start()
    say(f"{sc.name}: load on ({prefix}); {repeats} fault(s)")
    try:
        time.sleep(random.uniform(warm, warm + 10))
        for i in range(repeats):
            what = sc.fault(platform)
            at = time.monotonic()
            row.faults += 1
            say(f"{sc.name}: fault {i + 1}: {what}")
            if what.startswith("no "):
                row.not_injected += 1
                row.note += f" {what};"
            rec = wait_recovered(platform, sender, at, min_seconds=random.uniform(gap, gap + 15))
            say(f"{sc.name}: fault {i + 1}: " + (f"recovered in {rec:.0f} s" if rec else "NOT recovered"))
            if rec is None:
                row.note += f" fault {i + 1} not recovered in 300 s;"
            row.recovery = (
                None
                if rec is None or (row.faults > 1 and row.recovery is None)
                else max(rec, row.recovery or 0)
            )
        sender.finish(timeout=180)
        if wait_drained(platform, sender, timeout=300) is None:
            row.note += " NOT drained within 300 s;"
            row.recovery = None
        count(platform, sender, row)
    finally:
        sender.abandon.set()
        say(f"{sc.name}: answers {dict(sorted(sender.ledger.statuses.items()))}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="each fault once, shorter waits (~10 min)")
    ap.add_argument("--scenarios", help="comma-separated names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary METER_HOME directories")
    args = ap.parse_args()
    # Started in the background by a shell, SIGINT arrives ignored; Ctrl-C and kill must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:12} {sc.what}")
        return 0
    chosen = SCENARIOS
    if args.scenarios:
        names = args.scenarios.split(",")
        unknown = set(names) - {s.name for s in SCENARIOS}
        if unknown:
            ap.error(f"unknown scenarios {sorted(unknown)}; --list shows them")
        chosen = [s for s in SCENARIOS if s.name in names]
    rows: list[Row] = []
    base = Path(tempfile.mkdtemp(prefix="meter-chaos-"))
    shared: Platform | None = None
    try:
        for sc in chosen:
            own = bool(sc.env) or sc.tmpfs
            if own:
                home = base / sc.name
                if sc.tmpfs:
                    err = mount_tmpfs(home / ".meter" / "nats")
                    if err:
                        say(f"{sc.name}: SKIPPED, cannot mount a tmpfs ({err})")
                        rows.append(Row(sc.name, note=f"skipped: mount failed ({err})"))
                        continue
                platform = Platform(home, extra_env=sc.env)
            else:
                if shared is None:
                    shared = Platform(base / "shared")
                platform = shared
            try:
                if platform.proc is None:
                    say(f"{sc.name}: meter up (METER_HOME={platform.home})")
                    platform.start()
                rows.append(run_scenario(sc, platform, args.short))
            except Exception as exc:
                say(f"{sc.name}: ERROR {exc!r}")
                rows.append(Row(sc.name, note=f"error: {exc!r}"[:200]))
            finally:
                if own:
                    platform.stop()
                    if sc.tmpfs:
                        subprocess.run(["umount", "-l", str(home / ".meter" / "nats")], check=False)
            print_table(rows)
    finally:
        if shared:
            shared.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"kept {base}")
    print_table(rows)
    return 0 if rows and all(r.ok() or r.note.startswith("skipped") for r in rows) else 1


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'scenario':12} {'faults':>6} {'acked':>7} {'stored':>7} {'missing':>7} {'doubled':>7} "
        f"{'no202':>6} {'(t/o)':>6} {'gaps':>5} {'agg!=':>5} {'api!=':>5} {'recovery':>9}  ok  note"
    )
    print("\n" + head + "\n" + "-" * len(head), flush=True)
    for r in rows:
        rec = f"{r.recovery:.0f} s" if r.recovery is not None else "-"
        gaps = "-" if r.ledger_gaps is None else str(r.ledger_gaps)
        print(
            f"{r.name:12} {r.faults:>6} {r.acked:>7} {r.stored:>7} {r.missing:>7} {r.doubled:>7} "
            f"{r.unacked_stored:>6} {r.unacked_stored_timed_out:>6} {gaps:>5} {r.agg_mismatch:>5} "
            f"{r.api_mismatch:>5} {rec:>9}  {'yes' if r.ok() else 'NO '} {r.note.strip()}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
