"""Freshness after a quiet spell: how soon the first event after minutes (or an hour) without traffic is
in the usage API, on the whole platform as ``meter up`` runs it (Dagster daemon, sensor, runs).

Run with ``.venv/bin/python bench/quiet.py`` (or ``make bench``, which runs it last). It starts
``meter up`` in a fresh temporary folder on free ports, waits until the platform has taken a first
event, then ``--probes`` times: stays quiet for ``--quiet-seconds``, sends one event to the gateway
and times from its 202 until ``GET /v1/meters/api_calls/usage`` for that event's customer counts it.
With ``--compare-cold`` it does the same again with warm runs off (``METER_WARM_RUNS=0``: a run is
launched only once events wait), the design before warm runs, measured in the same session.
It prints numbers and never fails on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
METER = Path(sys.executable).with_name("meter")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Platform:
    """``meter up`` in its own folder, ports and process group; stopped with everything it started."""

    def __init__(self, parent: str | None, warm: bool):
        self.home = Path(tempfile.mkdtemp(prefix="meter-quiet-", dir=parent))
        self.port = _free_port()
        dagster_home = self.home / "dagster_home"
        dagster_home.mkdir()
        shutil.copy(ROOT / "dagster_home" / "dagster.yaml", dagster_home)
        shutil.copy(ROOT / "workspace.yaml", self.home)  # meter up reads it beside DAGSTER_HOME
        env = {
            **os.environ,
            "METER_HOME": str(self.home),
            "METER_GATEWAY_PORT": str(self.port),
            "METER_DAGSTER_PORT": str(_free_port()),
            "DAGSTER_HOME": str(dagster_home),
            "METER_WARM_RUNS": "1" if warm else "0",
        }
        for name in ("METER_NATS_URL", "METER_DATABASE_URL", "METER_API_KEY"):
            env.pop(name, None)
        self.log = open(self.home / "meter-up.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(METER), "up"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240) -> httpx.Client:
        """A client with the platform's admin key, once the gateway answers /readyz."""
        deadline = time.monotonic() + timeout
        key_file = self.home / ".meter" / "api-key"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"meter up exited; see {self.home / 'meter-up.log'}")
            try:
                if key_file.exists() and httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    key = key_file.read_text().strip()
                    return httpx.Client(
                        base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=10
                    )
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(
            f"the platform was not ready within {timeout:.0f} s; see {self.home / 'meter-up.log'}"
        )

    def stop(self, keep: bool) -> None:
        """SIGTERM to ``meter up`` (it stops its children), SIGKILL to the group if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if not keep:
            shutil.rmtree(self.home, ignore_errors=True)


def visible_after(client: httpx.Client, timeout: float, poll: float = 0.02) -> float:
    """Send one event for a new customer; seconds from its 202 until the usage API counts it."""
    customer = f"quiet-{uuid.uuid4().hex[:12]}"
    now = datetime.now(UTC)
    event = {"event_type": "api_call", "customer_id": customer, "properties": {"endpoint": "/quiet"}}
    answer = client.post("/v1/events", json=event)
    accepted = time.monotonic()
    answer.raise_for_status()
    params = {
        "customer_id": customer,
        "from": (now - timedelta(hours=1)).isoformat(),
        "to": (now + timedelta(hours=1)).isoformat(),
    }
    while time.monotonic() - accepted < timeout:
        rows = client.get("/v1/meters/api_calls/usage", params=params).json().get("data", [])
        if rows and rows[0]["value"] >= 1:
            return time.monotonic() - accepted
        time.sleep(poll)
    return float("inf")


#: Without warm runs a run stops 60 s after its last event: a shorter quiet spell measures nothing.
COLD_MIN_QUIET = 75.0


def measure(args: argparse.Namespace, warm: bool) -> list[float]:
    """Start a platform, take a first event, then time ``--probes`` events each after a quiet spell."""
    platform = Platform(args.tmp_dir, warm)
    label = "warm runs on" if warm else "warm runs off"
    quiet = args.quiet_seconds if warm else max(args.quiet_seconds, COLD_MIN_QUIET)
    try:
        client = platform.wait_ready()
        first = visible_after(client, timeout=300)
        print(f"  [{label}] platform up; the first event took {first:.1f} s (includes the first run launch)")
        times = []
        for i in range(args.probes):
            time.sleep(quiet)
            seconds = visible_after(client, timeout=args.timeout)
            times.append(seconds)
            print(f"  [{label}] probe {i + 1}/{args.probes} after {quiet:g} s quiet: {seconds:.3f} s")
        return times
    finally:
        platform.stop(args.keep)


def _summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"p50 {ordered[len(ordered) // 2]:.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s over {len(times)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quiet-seconds", type=float, default=30.0, help="quiet before each probe (3600: an hour)"
    )
    p.add_argument("--probes", type=int, default=5, help="events timed, each after a quiet spell")
    p.add_argument("--timeout", type=float, default=120.0, help="give up on a probe after this long")
    p.add_argument(
        "--compare-cold",
        action="store_true",
        help=f"also measure with warm runs off (quiet >= {COLD_MIN_QUIET:g} s)",
    )
    p.add_argument("--tmp-dir", help="parent folder of the temp dir (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (meter up's log, data)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so the platform started is stopped (measure's finally)

    signal.signal(signal.SIGTERM, on_sigterm)
    print("FRESHNESS AFTER QUIET (202 -> counted by the usage API, whole platform via `meter up`)")
    warm = measure(args, warm=True)
    cold = measure(args, warm=False) if args.compare_cold else []
    print(f"  warm runs on : {_summary(warm)}   target p95 <= 3 s")
    if cold:
        print(f"  warm runs off: {_summary(cold)}   (a run is launched for the first event after quiet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
