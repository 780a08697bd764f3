"""The SDK through a gateway that goes away and comes back, a stream that is full, and a program that
exits without closing its client: every accepted event is stored once — nothing lost, nothing doubled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from meter_platform.sdk import DeliveryError, MeterClient, RetryPolicy, Unavailable
from tests.helpers import limit_stream, query, run_drain
from tests.sdk.conftest import stored_ids

PROPS = {"endpoint": "/v1/users", "method": "GET", "region": "us-east-1", "bytes_transferred": 100}


def test_a_gateway_stopped_mid_stream_and_back_on_the_same_port_loses_and_doubles_nothing(
    restartable_gateway, admin_key, nats_server, database_url, catalog
):
    total, reported = 1500, []
    policy = RetryPolicy(budget=0.5, initial_backoff=0.05, max_backoff=0.2)  # shorter than the outage
    meter = MeterClient(restartable_gateway.url, admin_key, batch_size=50, flush_interval=0.05, retry=policy,
                        concurrency=2, on_error=lambda error, events: reported.append(error))  # fmt: skip
    ids: list[str] = []
    halfway = threading.Event()

    def track() -> None:
        for n in range(total):
            ids.append(meter.track("api_call", "outage", PROPS))
            if n == total // 3:
                halfway.set()
            time.sleep(0.001)

    tracker = threading.Thread(target=track)
    tracker.start()
    assert halfway.wait(30)
    restartable_gateway.stop()  # mid-stream: batches fail while the tracker keeps tracking
    time.sleep(1.5)
    assert meter.buffer.queued > 0  # the events wait in the buffer
    restartable_gateway.start()  # the same port
    tracker.join(60)
    meter.close()
    assert reported and all(isinstance(e, DeliveryError) for e in reported)  # told, never dropped
    counts = run_drain(nats_server.url, database_url, catalog)
    assert len(set(ids)) == total
    assert stored_ids(database_url) == total == counts.stored
    assert counts.events == counts.stored + counts.duplicates  # a lost answer's resend: a duplicate
    assert {r[0] for r in query(database_url, "SELECT id FROM usage_events")} == set(ids)
    doubled = query(
        database_url,
        "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls' AND customer_id = 'outage'",
    )[0][0]
    assert doubled == total


def test_a_full_stream_is_retried_after_retry_after_and_the_budget_is_kept(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    limit_stream(nats_server.url, 1)
    event = {"event_type": "api_call", "customer_id": "full", "properties": PROPS}
    try:
        with MeterClient(gateway_url, admin_key, retry=RetryPolicy(budget=0.5)) as meter:
            first = meter.send([event])
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:  # 503 + Retry-After: 1 s does not fit 0.5 s
                meter.send([event])
            assert time.monotonic() - started < 0.5
            assert caught.value.attempts == 1 and isinstance(caught.value.cause, Unavailable)
            assert caught.value.cause.retry_after is not None and caught.value.cause.retry_after >= 1
            meter.retry = RetryPolicy(budget=30)
            drainer = threading.Timer(0.3, run_drain, (nats_server.url, database_url, catalog))
            drainer.start()  # room comes back once the pipeline takes the first message
            started = time.monotonic()
            second = meter.send([event])
            assert time.monotonic() - started >= 0.9  # waited for Retry-After, not hammering
            drainer.join(30)
    finally:
        limit_stream(nats_server.url, -1)
    run_drain(nats_server.url, database_url, catalog)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(first + second)


EXIT_SCRIPT = """
import asyncio, sys
from meter_platform.sdk import AsyncMeterClient, MeterClient

url = sys.argv[1]
sync = MeterClient(url, flush_interval=60)  # the key from METER_API_KEY; never closed
for n in range(5):
    print(sync.track("api_call", "at-exit", {"endpoint": "/e", "method": "GET", "region": "r"}))

async def main():
    client = AsyncMeterClient(url, flush_interval=60)  # never closed either; the loop ends under it
    for n in range(3):
        print(await client.track("api_call", "at-exit", {"endpoint": "/e", "method": "GET", "region": "r"}))

asyncio.run(main())
"""


def test_clients_not_closed_are_flushed_at_interpreter_exit(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    env = {**os.environ, "METER_API_KEY": admin_key}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_SCRIPT), gateway_url],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 8
    run_drain(nats_server.url, database_url, catalog)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(ids)


QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "examples" / "sdk_quickstart.py"


def test_the_quickstart_example_runs_and_prints_the_usage(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    stop = threading.Event()

    def pipeline() -> None:  # what the Dagster sensor and job do under `make up`
        while not stop.is_set():
            run_drain(nats_server.url, database_url, catalog)

    drainer = threading.Thread(target=pipeline, daemon=True)
    drainer.start()
    try:
        done = subprocess.run(
            [sys.executable, str(QUICKSTART), gateway_url],
            env={**os.environ, "METER_API_KEY": admin_key}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        stop.set()
        drainer.join(30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tracked 3 events" in done.stdout and "total 3" in done.stdout, done.stdout


def test_a_429_is_retried_after_retry_after_with_the_same_ids(
    gateway_url, nats_server, database_url, catalog
):
    from meter_platform.access import create_key
    from meter_platform.storage import db

    with db.connect(database_url) as conn:  # a key allowed 2 requests a second
        _, secret = create_key(conn, ["ingest"], name="slow", requests_per_second=2)
        conn.commit()
    event = {"event_type": "api_call", "customer_id": "rate", "properties": PROPS}
    with MeterClient(gateway_url, secret, retry=RetryPolicy(budget=30)) as meter:
        ids = [i for _ in range(6) for i in meter.send([event, event])]
        assert meter.stats.retries > 0 and meter.stats.requests == 6 + meter.stats.retries
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.stored, counts.duplicates) == (12, 0)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(ids)
