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

The pieces, beside this entry point: ``events.py`` (the load), ``stack.py`` (the processes and their
CPU), ``clients.py`` (HTTP load clients), ``capture.py``, ``e2e.py``, ``drain_child.py`` (``--role
drain``) and ``report.py`` (what is printed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

# The sibling modules are imported by their plain names: Python puts this script's folder first on
# sys.path when it runs as `python bench/ingest_bench.py` (as `make bench` and the drain child do).
from capture import Result, run_capture
from drain_child import drain_child
from e2e import E2EResult, run_e2e
from events import EventFactory
from report import machine_facts, print_capture, print_e2e, print_targets, say
from stack import Stack, run_async


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
    p.add_argument("--partition", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
            capture = run_async(run_capture(stack, args, factory))
        if args.only in (None, "e2e"):
            stages, checks = run_async(run_e2e(stack, args, factory))
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        stack.stop()
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
    print_targets(capture, stages, args)
    print(
        f"\n(whole run {time.monotonic() - began:.0f} s; 'other' = CPU used meanwhile by programs outside "
        "the benchmark, as % of one core: high values mean the figures are low)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
