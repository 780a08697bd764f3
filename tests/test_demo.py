"""``meter demo``: the traffic it makes honours the catalog, its expected totals are exact, and a run
through a real gateway, JetStream and PostgreSQL counts exactly those totals."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from meter_platform.capture.envelope import (
    check_times,
    datetime_to_us,
    decode_events,
    format_timestamp,
    now_us,
    parse_timestamp,
    us_to_datetime,
)
from meter_platform.cli import demo
from meter_platform.ingestion.validation import validate_event_type
from meter_platform.runtime.servers import free_port
from tests.helpers import ADMIN_KEY, AUTH, api_call, publish, query, run_drain

NOW = datetime(2025, 7, 24, 10, 30, 45, 123456, tzinfo=UTC)


def offline_run(
    events: int = 3000, batch_size: int = 250, seed: int = 5, token: str = "t0k3n"
) -> list[bytes]:
    """Every request body of a run, in plan order, made without a network (as the sender makes them)."""
    generator = demo.TrafficGenerator(token, seed)
    traffic = demo.Traffic(generator, demo.plan_requests(events, batch_size, random.Random(seed)))
    return [demo.encode_events(traffic.events_for(spec, NOW)) for spec in traffic.plan]


def wire_events(bodies: list[bytes]) -> list[dict[str, Any]]:
    """The events as the gateway reads them off the wire: plain JSON, fractions as floats."""
    return [event for body in bodies for event in json.loads(body)]


def test_generated_events_pass_the_gateway_and_the_catalog(catalog):
    bodies = offline_run()
    for body in bodies:  # the envelope, as the gateway checks it at the door
        events, errors, was_array = decode_events(body)
        assert errors == [] and was_array
        assert check_times(events, datetime_to_us(NOW)) == []
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in wire_events(bodies):
        by_type[event["event_type"]].append(event)
    assert set(by_type) == set(demo.EVENT_TYPES)
    for event_type, events in by_type.items():  # the properties, as the pipeline validates them
        failures = validate_event_type(
            catalog.event_types[event_type],
            [e["id"] for e in events],
            [e["customer_id"] for e in events],
            [e["properties"] for e in events],
        )
        assert failures == {}, f"{event_type}: {dict(list(failures.items())[:3])}"
    messages = by_type["message_sent"]
    assert {m["properties"]["channel"] for m in messages} == {"sms", "email", "push", "whatsapp"}
    assert {type(m["properties"]["segments"]) for m in messages} == {int}
    assert any(q["properties"]["cached"] for q in by_type["analytics_query"])


def test_events_look_like_real_traffic():
    events = wire_events(offline_run())
    fresh = {e["id"]: e for e in events}
    assert len(fresh) == 3000
    assert all(
        e["id"].startswith("demo-t0k3n-") and e["customer_id"].startswith("cust-t0k3n-") for e in events
    )
    for e in events:  # RFC 3339 UTC with microseconds, a few seconds before "now"
        assert len(e["timestamp"]) == len("2025-07-24T10:30:45.123456Z") and e["timestamp"].endswith("Z")
        assert NOW - demo.MAX_JITTER < parse_timestamp(e["timestamp"]) <= NOW
        assert set(e["metadata"]) == {"user_agent", "ip_address", "demo_run"}
    per_customer = Counter(e["customer_id"] for e in fresh.values()).most_common()
    assert len(per_customer) > 20
    # Zipf-like: the biggest customer sends several times what the median one does.
    assert per_customer[0][1] > 5 * per_customer[len(per_customer) // 2][1]
    gb_hours = [e["properties"]["gb_hours"] for e in events if e["event_type"] == "storage_usage"]
    assert all(Decimal(str(v)) == Decimal(str(v)).quantize(Decimal("0.001")) for v in gb_hours)


def test_rfc3339_formats_like_the_platform():
    for us in (datetime_to_us(NOW), 0, now_us(), datetime_to_us(NOW) + 999_999):
        assert demo.rfc3339(us) == format_timestamp(us_to_datetime(us))


def test_same_seed_same_traffic_and_resends_are_exact_copies():
    bodies = offline_run(seed=9)
    assert bodies == offline_run(seed=9)
    assert bodies != offline_run(seed=10)
    plan = demo.plan_requests(3000, 250, random.Random(9))
    first_seen: dict[str, bytes] = {}
    resent = 0
    for spec, body in zip(plan, bodies, strict=True):
        for event in json.loads(body):
            raw = json.dumps(event, sort_keys=True).encode()
            if spec.resend_of is None:
                first_seen[event["id"]] = raw
            else:  # a re-send carries an event sent before, byte for byte
                assert first_seen[event["id"]] == raw
                resent += 1
    assert resent == 30  # 1% of 3000
    assert all(spec.resend_of < spec.index for spec in plan if spec.resend_of is not None)


@pytest.mark.parametrize(("events", "batch_size"), [(1, 500), (999, 500), (20_000, 500), (1000, 7)])
def test_plan_sends_every_event_once_and_about_one_percent_again(events, batch_size):
    plan = demo.plan_requests(events, batch_size, random.Random(1))
    fresh = [s for s in plan if s.resend_of is None]
    assert sum(s.count for s in fresh) == events
    assert [s.first for s in fresh] == list(range(1, events + 1, batch_size))
    assert all(0 < s.count <= batch_size for s in plan)
    resent = sum(s.count for s in plan if s.resend_of is not None)
    assert resent == max(1, round(events * demo.RESEND_SHARE))


def hand_totals(bodies: list[bytes]) -> dict[str, Decimal]:
    """The example catalog's meters, recomputed by hand from the request bodies, each id once."""
    events = {}
    for body in bodies:
        for event in json.loads(body, parse_float=Decimal):
            events.setdefault(event["id"], event)
    totals = dict.fromkeys(
        ("api_calls", "bytes_transferred", "storage_gb_hours", "storage_bandwidth_bytes", "messages_sent",
         "sms_segments", "call_minutes", "analytics_queries", "rows_scanned"),
        Decimal(0),
    )  # fmt: skip
    for e in events.values():
        p = e["properties"]
        if e["event_type"] == "api_call":
            totals["api_calls"] += 1
            totals["bytes_transferred"] += p["bytes_transferred"]
        elif e["event_type"] == "storage_usage":
            totals["storage_gb_hours"] += p["gb_hours"]
            totals["storage_bandwidth_bytes"] += p["egress_bytes"]
        elif e["event_type"] == "message_sent":
            totals["messages_sent"] += 1
            if p["channel"] == "sms":
                totals["sms_segments"] += p["segments"]
        elif e["event_type"] == "call_completed":
            totals["call_minutes"] += p["duration_minutes"]
        elif e["event_type"] == "analytics_query":
            totals["analytics_queries"] += 1
            totals["rows_scanned"] += p["rows_scanned"]
    return totals


def test_expected_totals_equal_a_hand_recomputation(catalog):
    generator = demo.TrafficGenerator("t0k3n", 5)
    traffic = demo.Traffic(generator, demo.plan_requests(3000, 250, random.Random(5)))
    expectation = demo.Expectation(catalog.meters)
    bodies = []
    for spec in traffic.plan:
        events = traffic.events_for(spec, NOW)
        expectation.add(events)
        bodies.append(demo.encode_events(events))
    assert (expectation.unique, expectation.duplicates) == (3000, 30)
    assert expectation.unchecked == []
    assert expectation.totals == hand_totals(bodies)
    assert all(v > 0 for v in expectation.totals.values())


def test_expected_sums_are_exact_decimals(catalog):
    expectation = demo.Expectation(catalog.meters)

    def storage(event_id: str, gb_hours: Decimal) -> dict[str, Any]:
        return {"id": event_id, "event_type": "storage_usage", "customer_id": "c",
                "properties": {"bucket": "b", "gb_hours": gb_hours, "egress_bytes": 1}}  # fmt: skip

    def sms(event_id: str, channel: str, segments: Any) -> dict[str, Any]:
        return {"id": event_id, "event_type": "message_sent", "customer_id": "c",
                "properties": {"channel": channel, "segments": segments}}  # fmt: skip

    expectation.add(
        [storage("s1", Decimal("0.1")), storage("s2", Decimal("0.2")), storage("s1", Decimal("0.1"))]
    )
    expectation.add([sms("m1", "sms", 3), sms("m2", "email", 1), sms("m3", "sms", True), sms("m1", "sms", 3)])
    assert expectation.totals["storage_gb_hours"] == Decimal("0.3")  # 0.1 + 0.2 as floats is not 0.3
    assert expectation.totals["storage_bandwidth_bytes"] == 2
    assert expectation.totals["messages_sent"] == 3
    assert expectation.totals["sms_segments"] == 3  # email filtered out; a boolean is not a number
    assert (expectation.unique, expectation.duplicates) == (5, 2)
    with pytest.raises(TypeError, match="not float"):
        expectation.add([storage("s3", 0.5)])  # type: ignore[arg-type]


# --- end to end: a real gateway (uvicorn), real JetStream and PostgreSQL ---------------------------


def stored_totals(database_url: str, customers: set[str]) -> dict[str, Decimal]:
    """Each meter's total over the given customers, straight from the per-minute aggregates."""
    rows = query(
        database_url,
        "SELECT meter_slug, sum(event_count), coalesce(sum(value_sum), 0) FROM usage_minute_aggregates"
        " WHERE customer_id = ANY(%s) GROUP BY meter_slug",
        (sorted(customers),),
    )
    return {slug: Decimal(count) if slug in ("api_calls", "messages_sent", "analytics_queries") else value
            for slug, count, value in rows}  # fmt: skip


def test_demo_through_the_real_gateway_counts_exactly_the_expected_totals(
    gateway_url, nats_server, database_url, catalog
):
    out = io.StringIO()
    result = demo.run_demo(
        gateway_url, events=4000, batch_size=300, seed=3, wait=False, catalog=catalog, out=out
    )
    assert result.exit_code == 0, out.getvalue()
    assert result.stats is not None and result.expectation is not None
    assert result.stats.accepted == 4040 and result.stats.resent == 40
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates, counts.quarantined) == (4040, 4000, 40, 0)
    expected = result.expectation.totals
    assert stored_totals(database_url, result.customers) == {slug: v for slug, v in expected.items() if v}

    # The demo's own check, through the usage API, agrees; and it does notice a wrong total.
    async def check() -> list[demo.MeterCheck]:
        async with httpx.AsyncClient(base_url=gateway_url, headers=AUTH) as client:
            start = result.started - demo.QUERY_MARGIN
            return await demo.check_meters(client, result.expectation, result.customers, start,
                                           datetime.now(UTC) + timedelta(minutes=1))  # fmt: skip

    checks = asyncio.run(check())
    assert [c.slug for c in checks] == [m.slug for m in catalog.meters]
    assert all(c.ok for c in checks), checks
    result.expectation.totals["storage_gb_hours"] += Decimal("0.001")
    assert [c.slug for c in asyncio.run(check()) if not c.ok] == ["storage_gb_hours"]


def test_meter_demo_waits_for_the_pipeline_and_reports_every_meter_matching(
    gateway_url, nats_server, database_url, catalog, capsys
):
    stop = threading.Event()

    def pipeline() -> None:  # what the Dagster sensor and job do under `meter up`
        while not stop.is_set():
            run_drain(nats_server.url, database_url, catalog)

    worker = threading.Thread(target=pipeline, name="pipeline", daemon=True)
    worker.start()
    try:
        args = argparse.Namespace(events=2500, rate=None, batch_size=500, seed=None, no_wait=False,
                                  gateway=gateway_url, wait_timeout=60)  # fmt: skip
        assert demo.run(args, gateway_url) == 0, capsys.readouterr().out
    finally:
        stop.set()
        worker.join(30)
    printed = capsys.readouterr().out
    assert "all 9 meters match" in printed
    assert printed.count("✓") == 9 and "✗" not in printed


def test_meter_demo_paces_to_the_rate(gateway_url):
    out = io.StringIO()
    started = time.monotonic()
    result = demo.run_demo(gateway_url, events=600, batch_size=100, rate=1000, seed=1, wait=False, out=out)
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, out.getvalue()
    # 606 events at 1000/s, the first batch of 100 (the bucket's burst) immediately: about half a second.
    assert elapsed > 0.45


def test_meter_demo_stops_on_a_refused_request(gateway_url, monkeypatch, capsys):
    monkeypatch.setattr(demo, "encode_events", lambda events: b'[{"event_type": ""}]')
    result = demo.run_demo(gateway_url, events=100, seed=1, wait=False, out=io.StringIO())
    assert result.exit_code == 2
    assert "answered 400" in capsys.readouterr().err


def test_meter_demo_says_when_the_gateway_is_not_there(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert demo.run_demo(url, events=10, wait=False, out=io.StringIO()).exit_code == 2
    assert "is `meter up` running" in capsys.readouterr().err


def test_a_503_is_retried_with_the_same_ids_until_the_stream_has_room(
    gateway_url, nats_server, database_url, catalog
):
    """A full stream makes the real gateway answer 503; the demo retries the same bodies until a drain
    frees room, and every event is counted once."""
    from dataclasses import replace as dc_replace

    from meter_platform.capture import jetstream

    async def limit_stream(max_msgs: int) -> None:
        nc = await jetstream.connect(nats_server.url, name="tests")
        await nc.jetstream().update_stream(dc_replace(jetstream.stream_config(), max_msgs=max_msgs))
        await nc.close()

    asyncio.run(limit_stream(2))
    generator = demo.TrafficGenerator("full0", 3)
    traffic = demo.Traffic(generator, demo.plan_requests(600, 100, random.Random(3)))
    expectation = demo.Expectation(catalog.meters)
    stop = threading.Event()

    def drain_until_stopped() -> None:  # the pipeline, freeing room in the stream as it commits
        while not stop.is_set():
            run_drain(nats_server.url, database_url, catalog)

    async def send() -> demo.SendStats:
        async with demo.demo_client(gateway_url, ADMIN_KEY, concurrency=2) as client:
            return await demo.send_traffic(client, traffic, expectation, concurrency=2)

    drainer = threading.Thread(target=drain_until_stopped)
    try:
        drainer.start()  # the stream fills after two messages: senders meet 503s until it commits
        stats = asyncio.run(send())
    finally:
        stop.set()
        drainer.join(60)
        asyncio.run(limit_stream(-1))
    run_drain(nats_server.url, database_url, catalog)
    assert stats.retries > 0, "the stream limit never produced a 503"
    assert stats.accepted == expectation.unique + expectation.duplicates
    assert stored_totals(database_url, set(generator.customer_ids)) == expectation.totals


def test_waiting_gives_up_when_the_pipeline_does_not_count(gateway_url, nats_server):
    """Nothing drains here: the real ingest status keeps showing pending events, so waiting times out."""
    publish(nats_server.url, [api_call("never-drained")])

    async def wait() -> bool:
        async with httpx.AsyncClient(base_url=gateway_url, headers=AUTH) as client:
            return await demo.wait_for_pipeline(client, baseline=0, accepted=1, timeout=0.5, poll=0.1)

    assert asyncio.run(wait()) is False
