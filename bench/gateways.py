"""Capture throughput against the number of gateway processes on one port, per ASGI server.

Run with ``.venv/bin/python bench/gateways.py`` (about 2 minutes with the defaults). It starts NATS and
PostgreSQL once, as ``bench/ingest_bench.py`` does, then for each server (``--servers``) and each number
of processes (``--processes``) starts the gateway as ``meter up`` would with
``METER_GATEWAY_SERVER=<server> METER_GATEWAY_WORKERS=<n>`` (the server's workers share the port;
``/metrics`` in Prometheus multiprocess mode), and measures the two capture shapes of the ingest
benchmark: 64 clients sending batches of ``--batch-size`` events, and single events. Each figure is the
median of ``--runs`` short runs. Printed: events/s and requests/s, their ratio to one process of the
same server, the gateway's CPU (all its processes, in % of one core) and its CPU per event or request.
Direct JetStream publishes of the same shapes are measured once, as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any

import httpx
from capture import Result, capture_direct, capture_gateway
from events import EventFactory
from ingest_bench import parse_args as bench_args
from report import say
from stack import Stack, _stop_process, purge_stream, run_async

from meter_platform.runtime.launch import gateway_command, gateway_env, installed_servers
from meter_platform.runtime.servers import free_port, spawn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--servers",
        default=",".join(installed_servers()),
        help="ASGI servers, comma-separated (default: those installed; granian is optional)",
    )
    p.add_argument("--processes", default="1,2,4", help="gateway processes on the port, comma-separated")
    p.add_argument("--runs", type=int, default=3, help="short runs per figure (the median is printed)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before each measurement")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent HTTP clients")
    p.add_argument("--batch-size", type=int, default=100, help="events per request of the batch shape")
    p.add_argument("--no-direct", action="store_true", help="skip the direct JetStream reference")
    p.add_argument("--tmp-dir", help="parent folder of the temp dir (its disk's fsync matters)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    return p.parse_args(argv)


def start_gateway(stack: Stack, server: str, processes: int) -> None:
    """Replace the stack's gateway with ``processes`` processes of ``server`` on a new port."""
    assert stack.tmp is not None
    _stop_process(stack.gateway)
    port = free_port()
    stack.gateway_url = f"http://127.0.0.1:{port}"
    env = gateway_env({**stack.env, "METER_GATEWAY_PORT": str(port)}, stack.tmp, workers=processes)
    log = stack.tmp / f"gateway-{server}-{processes}.log"
    stack.gateway = spawn(gateway_command("127.0.0.1", port, processes, server), log, env=env)
    deadline = time.monotonic() + 90
    while True:
        if stack.gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited; its log:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{stack.gateway_url}/readyz", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server} with {processes} process(es) did not become ready within 90 s")
        time.sleep(0.2)
    time.sleep(1.0 + 0.5 * processes)  # the other processes finish their start a moment after the first


def median_result(results: list[Result]) -> Result:
    """The run with the median events/s (its CPU figures with it)."""
    return sorted(results, key=lambda r: r.eps)[len(results) // 2]


async def measure(
    stack: Stack, args: argparse.Namespace, factory: EventFactory, batch: int, direct: bool = False
) -> Result:
    results = []
    for _ in range(args.runs):
        assert stack.nats is not None
        await purge_stream(stack.nats.url)
        run = capture_direct if direct else capture_gateway
        results.append(await run(stack, args, factory, batch))
    return median_result(results)


def _cpu_us(result: Result, per_request: bool) -> float:
    count = result.rps if per_request else result.eps
    return result.cpu.get("gateway", 0.0) * 1e4 / count if count else float("nan")


def print_table(rows: list[dict[str, Any]], direct: dict[int, Result], args: argparse.Namespace) -> None:
    print()
    print(
        f"GATEWAY PROCESSES  ({args.concurrency} clients; median of {args.runs} runs of {args.duration:g} s; "
        "ratio = against 1 process of the same server)"
    )
    head = (
        f"{'server':<8} {'procs':>5}  {'batch ev/s':>10} {'ratio':>5} {'CPU':>5} {'us/ev':>6}  "
        f"{'single req/s':>12} {'ratio':>5} {'CPU':>5} {'us/req':>6}  {'other':>5}"
    )
    print(head)
    print("-" * len(head))
    base: dict[str, tuple[float, float]] = {}
    for row in rows:
        b, s = row["batch"], row["single"]
        one = base.setdefault(row["server"], (b.eps, s.rps))
        print(
            f"{row['server']:<8} {row['processes']:>5}  {b.eps:>10,.0f} {b.eps / one[0]:>5.2f} "
            f"{b.cpu.get('gateway', 0):>4.0f}% {_cpu_us(b, False):>6.1f}  {s.rps:>12,.0f} "
            f"{s.rps / one[1]:>5.2f} {s.cpu.get('gateway', 0):>4.0f}% {_cpu_us(s, True):>6.0f}  "
            f"{max(b.cpu.get('other', 0), s.cpu.get('other', 0)):>4.0f}%"
        )
    if direct:
        print(
            f"direct JetStream: batch {direct[args.batch_size].eps:,.0f} events/s, "
            f"single {direct[1].rps:,.0f} msg/s"
        )
    print(
        f"(machine: {os.cpu_count()} CPUs; CPU = the gateway's processes in % of one core; 'other' = "
        "the most CPU used meanwhile outside the benchmark: high values mean the figures are low)"
    )


async def run_all(stack: Stack, args: argparse.Namespace) -> None:
    factory = EventFactory(f"g{os.urandom(4).hex()}")
    direct: dict[int, Result] = {}
    if not args.no_direct:
        for batch in (args.batch_size, 1):
            direct[batch] = await measure(stack, args, factory, batch, direct=True)
    rows = []
    for server in args.servers.split(","):
        for processes in [int(n) for n in args.processes.split(",")]:
            start_gateway(stack, server, processes)
            row: dict[str, Any] = {"server": server, "processes": processes}
            for key, batch in (("batch", args.batch_size), ("single", 1)):
                row[key] = result = await measure(stack, args, factory, batch)
                say(
                    f"{server} x{processes}, {key}: {result.eps:,.0f} events/s, {result.rps:,.0f} req/s, "
                    f"gateway CPU {result.cpu.get('gateway', 0):.0f}%, errors {result.errors or 0}"
                )
            rows.append(row)
    print_table(rows, direct, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack_args = bench_args(["--gateway-workers", "1", "--concurrency", str(args.concurrency)])
    for name in ("duration", "warmup", "tmp_dir", "keep"):
        setattr(stack_args, name, getattr(args, name))
    args.events, args.client = None, "raw"  # what the capture runs read beside the options above

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    stack = Stack(stack_args)
    try:
        stack.start()
        run_async(run_all(stack, args))
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
