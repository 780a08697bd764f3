"""``meter demo``: send realistic usage traffic through the gateway, then prove every event was counted once.

The demo plays the four use cases of the example catalog (API management, cloud storage, communication
APIs, analytics) for a few dozen customers with a skewed, Zipf-like share of the traffic, and re-sends
about 1% of the events unchanged, as a client retrying after a lost answer would. While sending it
computes, from exactly the JSON it sends, what every meter must show; afterwards it waits for the
pipeline to drain and compares those totals with the gateway's usage API.

Each run uses its own token in event ids (``demo-<token>-<n>``) and customer ids
(``cust-<token>-<k>``), so earlier runs in the same time range never blur the comparison.

The pieces are plain functions and classes (:class:`TrafficGenerator`, :func:`plan_requests`,
:class:`Traffic`, :class:`Expectation`) so the tests can check the traffic and the expected totals
without a network; :func:`run_demo` puts them together against a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import httpx
from tqdm import tqdm

from meter_platform.catalog import Catalog
from meter_platform.cli.common import api_key, auth_headers
from meter_platform.cli.demo.expectation import Expectation
from meter_platform.cli.demo.send import (
    CONCURRENCY,
    RETRY_BUDGET,
    DemoError,
    SendStats,
    TokenBucket,
    demo_client,
    send_traffic,
)
from meter_platform.cli.demo.traffic import (
    CUSTOMERS,
    EVENT_TYPES,
    MAX_JITTER,
    RESEND_EVERY,
    RESEND_SHARE,
    ZIPF_EXPONENT,
    RequestSpec,
    Traffic,
    TrafficGenerator,
    Weighted,
    encode_events,
    plan_requests,
    rfc3339,
)
from meter_platform.cli.demo.verify import (
    QUERY_MARGIN,
    WAIT_TIMEOUT,
    MeterCheck,
    check_meters,
    get_json,
    print_checks,
    processed_total,
    usage_for_customers,
    wait_for_pipeline,
)

__all__ = [
    "CONCURRENCY",
    "CUSTOMERS",
    "EVENT_TYPES",
    "EXIT_ERROR",
    "EXIT_MATCH",
    "EXIT_MISMATCH",
    "MAX_JITTER",
    "QUERY_MARGIN",
    "RESEND_EVERY",
    "RESEND_SHARE",
    "RETRY_BUDGET",
    "WAIT_TIMEOUT",
    "ZIPF_EXPONENT",
    "DemoError",
    "DemoResult",
    "Expectation",
    "MeterCheck",
    "RequestSpec",
    "SendStats",
    "TokenBucket",
    "Traffic",
    "TrafficGenerator",
    "Weighted",
    "check_meters",
    "demo_client",
    "encode_events",
    "plan_requests",
    "print_checks",
    "rfc3339",
    "run",
    "run_demo",
    "send_traffic",
    "usage_for_customers",
    "wait_for_pipeline",
]

EXIT_MATCH, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2


@dataclass
class DemoResult:
    """Everything a run did and found; ``exit_code`` is what ``meter demo`` returns."""

    exit_code: int
    token: str = ""
    seed: int = 0
    customers: set[str] = field(default_factory=set)
    expectation: Expectation | None = None
    stats: SendStats | None = None
    started: datetime | None = None
    checks: list[MeterCheck] = field(default_factory=list)


def _warn_missing_event_types(catalog: Catalog, out: TextIO) -> None:
    missing = [t for t in EVENT_TYPES if t not in catalog.event_types]
    if missing and not catalog.accept_unknown_event_types:
        print(
            f"warning: the catalog declares no {', '.join(missing)}; those events will be quarantined",
            file=out,
        )


async def _send(
    gateway_url: str, traffic: Traffic, expectation: Expectation, rate: float | None, out: TextIO
) -> SendStats | None:
    """Send the run's traffic through the SDK with a progress bar and print what was sent; None when
    it stopped."""
    with tqdm(total=traffic.total_events, desc="sending", unit="ev", unit_scale=True) as bar:
        try:
            async with demo_client(gateway_url, api_key()) as meter:
                # encode_events is looked up here, in this package, when the demo runs (see send_traffic).
                stats = await send_traffic(
                    meter, traffic, expectation, rate, progress=bar, encode=encode_events
                )
        except DemoError as exc:
            bar.close()
            print(f"meter demo: stopped: {exc}", file=sys.stderr)
            return None
    per_second = stats.accepted / stats.elapsed if stats.elapsed else float("inf")
    print(
        f"sent     {stats.accepted:,} events in {stats.requests:,} requests ({stats.retries} retried)\n"
        f"accepted {stats.accepted:,} = {expectation.unique:,} unique + {stats.resent:,} re-sent unchanged\n"
        f"elapsed  {stats.elapsed:.2f} s, {per_second:,.0f} events/s",
        file=out,
    )
    return stats


async def _wait(
    client: httpx.AsyncClient, baseline: int, accepted: int, wait_timeout: float, out: TextIO
) -> bool:
    """Wait for the pipeline to count the run's events, saying how long it took or that it gave up."""
    print("waiting for the pipeline to count them ...", file=out)
    waited = time.monotonic()
    if not await wait_for_pipeline(client, baseline, accepted, wait_timeout):
        print(
            f"gave up after {wait_timeout:.0f} s: the pipeline has not processed this run's events yet. "
            "Is the Dagster daemon running (`meter up` starts it)? `meter status` shows the backlog.",
            file=out,
        )
        return False
    print(f"counted in {time.monotonic() - waited:.1f} s after the last 202", file=out)
    return True


def _conclude(result: DemoResult, expectation: Expectation, out: TextIO) -> None:
    """Print the comparison table and its verdict; set the exit code."""
    print_checks(result.checks, expectation.unchecked, out)
    if all(c.ok for c in result.checks):
        print(
            f"all {len(result.checks)} meters match: {expectation.unique:,} events counted once each, "
            f"{expectation.duplicates:,} re-sent events not counted again",
            file=out,
        )
        result.exit_code = EXIT_MATCH
    else:
        bad = sum(not c.ok for c in result.checks)
        print(f"{bad} of {len(result.checks)} meters do not match what was sent", file=out)
        result.exit_code = EXIT_MISMATCH


async def _demo(
    gateway_url: str,
    catalog: Catalog,
    events: int,
    batch_size: int,
    rate: float | None,
    seed: int,
    wait: bool,
    wait_timeout: float,
    out: TextIO,
) -> DemoResult:
    token = secrets.token_hex(4)
    generator = TrafficGenerator(token, seed)
    traffic = Traffic(generator, plan_requests(events, batch_size, random.Random(f"{seed}:plan")))
    expectation = Expectation(catalog.meters)
    result = DemoResult(EXIT_ERROR, token, seed, generator.customer_ids, expectation)
    _warn_missing_event_types(catalog, out)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    timeout = httpx.Timeout(60.0, connect=5.0)
    async with httpx.AsyncClient(
        base_url=gateway_url, limits=limits, timeout=timeout, headers=auth_headers()
    ) as client:
        try:
            # Also the check that the gateway is there at all, before a long run of retries.
            baseline = processed_total(await get_json(client, "/v1/ingest/status")) if wait else 0
            if not wait:
                await get_json(client, "/healthz")
        except DemoError as exc:
            print(f"meter demo: {exc}; is `meter up` running at {gateway_url}?", file=sys.stderr)
            return result
        pace = f"{rate:,.0f} events/s" if rate else "as fast as possible"
        print(
            f"run {token} (seed {seed}): {events:,} events from {len(generator.customers)} customers, "
            f"{len(traffic.plan)} requests of up to {batch_size} events, {CONCURRENCY} in flight, {pace}"
            f" -> {gateway_url}",
            file=out,
        )
        result.started = datetime.now(UTC)
        stats = await _send(gateway_url, traffic, expectation, rate, out)
        if stats is None:
            return result
        result.stats = stats
        if not wait:
            print("not waiting for the pipeline (--no-wait); `meter status` shows its progress", file=out)
            result.exit_code = EXIT_MATCH
            return result
        if not await _wait(client, baseline, stats.accepted, wait_timeout, out):
            result.exit_code = EXIT_MISMATCH
            return result
        now = datetime.now(UTC)
        result.checks = await check_meters(
            client, expectation, result.customers, result.started - QUERY_MARGIN, now + QUERY_MARGIN
        )
    _conclude(result, expectation, out)
    return result


def run_demo(
    gateway_url: str,
    events: int = 10_000,
    batch_size: int = 500,
    rate: float | None = None,
    seed: int | None = None,
    wait: bool = True,
    wait_timeout: float = WAIT_TIMEOUT,
    catalog: Catalog | None = None,
    out: TextIO | None = None,
) -> DemoResult:
    """Send the demo traffic to ``gateway_url`` and, when ``wait``, check every meter's total.

    ``catalog`` defaults to the one in ``METER_CATALOG_DIR``; it must be the gateway's. Exit codes:
    0 all meters match (or not waiting), 1 a mismatch or the pipeline did not finish in time,
    2 the demo could not send (gateway unreachable or refusing the requests).
    """
    out = out or sys.stdout
    if events < 1 or batch_size < 1 or (rate is not None and rate <= 0):
        print("meter demo: --events and --batch-size must be at least 1, --rate above 0", file=sys.stderr)
        return DemoResult(EXIT_ERROR)
    if catalog is None:
        from meter_platform.catalog import load_catalog
        from meter_platform.config import load_settings

        catalog = load_catalog(load_settings().catalog_dir)
    # A seed is always used (and shown), so any run can be repeated with --seed.
    seed = seed if seed is not None else random.SystemRandom().randrange(1_000_000)
    return asyncio.run(_demo(gateway_url, catalog, events, batch_size, rate, seed, wait, wait_timeout, out))


def run(args: argparse.Namespace, gateway_url: str) -> int:
    """``meter demo``: the CLI entry point; returns the exit code."""
    return run_demo(
        gateway_url,
        events=args.events,
        batch_size=args.batch_size,
        rate=args.rate,
        seed=args.seed,
        wait=not args.no_wait,
        wait_timeout=getattr(args, "wait_timeout", WAIT_TIMEOUT),
    ).exit_code
