"""MeterClient against the real gateway, JetStream and PostgreSQL: every tracked event stored once,
refusals typed and never retried, a full buffer refuses clearly, threads lose nothing, typed reads."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from meter_platform.billing import invoicing
from meter_platform.runtime.servers import free_port
from meter_platform.sdk import (
    BufferFull,
    ClientClosed,
    DeliveryError,
    IngestStatus,
    InvalidRequest,
    ItemError,
    MeterClient,
    RejectedEvents,
    RetryPolicy,
    StoredEvent,
    Usage,
    UsageRow,
)
from tests.billing.support import AFTER_GRACE, MARCH
from tests.helpers import query, run_drain
from tests.sdk.conftest import GatewayThread, stored_ids

PROPS = {"endpoint": "/v1/users", "method": "GET", "region": "us-east-1", "bytes_transferred": 100}


def count_requests(client: MeterClient) -> list[httpx.Request]:
    """Every request the client's HTTP connection pool sends (an event hook; nothing is replaced)."""
    seen: list[httpx.Request] = []
    client._http.event_hooks["request"].append(seen.append)
    return seen


def test_tracked_events_are_stored_exactly_once_and_read_back(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    with MeterClient(gateway_url, admin_key, batch_size=100, flush_interval=0.2) as meter:
        requests = count_requests(meter)
        ids = [meter.track("api_call", "sdk-c1", PROPS) for _ in range(250)]
        meter.flush()
        assert meter.buffer.queued == meter.buffer.inflight == 0
        assert len(requests) == 3  # batches of 100, 100, 50
        resent = meter.send(
            [{"event_type": "api_call", "customer_id": "sdk-c1", "id": ids[0], "properties": PROPS}]
        )
        assert resent == [ids[0]]
        pending = meter.event(ids[1])
        counts = run_drain(nats_server.url, database_url, catalog)
        assert (counts.events, counts.stored, counts.duplicates) == (251, 250, 1)
        usage = meter.usage("api_calls", customer_id="sdk-c1", group_by=["customer_id"])
        stored = meter.event(ids[1])
        missing = meter.event("never-sent")
    assert len(set(ids)) == 250
    assert isinstance(pending, StoredEvent) and pending.state == "pending"
    assert isinstance(usage, Usage) and usage.total == 250
    assert all(isinstance(row, UsageRow) and isinstance(row.window_start, datetime) for row in usage.data)
    assert usage.data[0].customer_id == "sdk-c1"
    assert isinstance(stored, StoredEvent) and stored.state == "stored" and stored.properties == PROPS
    assert stored.timestamp is not None and stored.timestamp.tzinfo is not None
    assert missing is None  # a 404 is None, by choice (documented on event())
    with pytest.raises(ClientClosed):
        meter.track("api_call", "sdk-c1", PROPS)


def test_a_400_is_typed_with_its_details_and_never_retried(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    future = datetime.now(UTC) + timedelta(days=1)
    events = [
        {"event_type": "api_call", "customer_id": "c", "properties": PROPS},
        {"event_type": "api_call", "customer_id": "c", "properties": PROPS, "timestamp": future},
    ]
    with MeterClient(gateway_url, admin_key) as meter:
        requests = count_requests(meter)
        with pytest.raises(InvalidRequest) as caught:
            meter.send(events)
    assert len(requests) == 1 and meter.stats.retries == 0
    error = caught.value
    assert error.status == 400 and error.error
    assert error.item_errors == [ItemError(index=1, field="timestamp", message=error.item_errors[0].message)]
    assert "ahead" in error.item_errors[0].message
    assert run_drain(nats_server.url, database_url, catalog).events == 0  # a batch is refused whole


def test_a_refused_event_in_a_background_batch_is_reported_and_the_others_are_sent(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    reported = []
    meter = MeterClient(
        gateway_url, admin_key, batch_size=10, on_error=lambda e, ev: reported.append((e, ev))
    )
    good = [meter.track("api_call", "c", PROPS) for _ in range(4)]
    bad = meter.track("api_call", "c", PROPS, timestamp=datetime.now(UTC) + timedelta(days=1))
    good += [meter.track("api_call", "c", PROPS) for _ in range(5)]
    with pytest.raises(RejectedEvents) as caught:
        meter.close()
    (rejection,) = caught.value.rejections
    assert [e["id"] for e in rejection.events] == [bad]
    assert [(i.index, i.field) for i in rejection.error.item_errors] == [(0, "timestamp")]
    assert [(type(e), [x["id"] for x in ev]) for e, ev in reported] == [(InvalidRequest, [bad])]
    run_drain(nats_server.url, database_url, catalog)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(good)


def test_threads_tracking_at_once_lose_and_double_nothing(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    threads, each = 8, 400
    with MeterClient(gateway_url, admin_key, batch_size=100, max_buffer=500, concurrency=2) as meter:
        ids: list[list[str]] = [[] for _ in range(threads)]

        def work(k: int) -> None:
            for _ in range(each):
                ids[k].append(meter.track("api_call", f"thread-{k % 3}", PROPS))

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
    counts = run_drain(nats_server.url, database_url, catalog)
    assert len({i for chunk in ids for i in chunk}) == threads * each
    assert (counts.stored, counts.duplicates, counts.quarantined) == (threads * each, 0, 0)
    assert stored_ids(database_url) == threads * each


def test_a_full_buffer_blocks_track_then_raises_buffer_full(
    settings, catalog, clean, admin_key, nats_server, database_url
):
    gateway = GatewayThread(settings, catalog)  # not started: nothing listens on its port yet
    policy = RetryPolicy(budget=30, initial_backoff=0.05, max_backoff=0.2)
    meter = MeterClient(
        gateway.url, admin_key, max_buffer=5, track_timeout=0.3, flush_interval=0.05, retry=policy
    )
    ids = [meter.track("api_call", "full", PROPS) for _ in range(5)]
    started = time.monotonic()
    with pytest.raises(BufferFull, match="nothing was dropped"):
        meter.track("api_call", "full", PROPS)
    assert time.monotonic() - started >= 0.3
    # The gateway comes: the retries deliver, room frees, and a waiting track goes through.
    threading.Timer(0.5, gateway.start).start()
    meter.track_timeout = 20
    ids.append(meter.track("api_call", "full", PROPS))
    try:
        meter.close()
    finally:
        gateway.stop()
    run_drain(nats_server.url, database_url, catalog)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(ids)


def test_undeliverable_events_stay_queued_and_close_says_so(admin_key):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    meter = MeterClient(url, admin_key, retry=RetryPolicy(budget=0.3, initial_backoff=0.05))
    ids = [meter.track("api_call", "c", PROPS) for _ in range(3)]
    with pytest.raises(DeliveryError) as caught:
        meter.close()
    assert caught.value.ids == ids and caught.value.attempts >= 2
    assert isinstance(caught.value.cause, httpx.ConnectError)
    assert [e["id"] for e in meter.pending()] == ids


def test_read_helpers_answer_typed_values(gateway_url, admin_key, database_url, march):
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    with MeterClient(gateway_url, admin_key) as meter:
        invoices = meter.invoices(period=MARCH)
        only_b = meter.invoices(customer_id="b", status="draft")
        meters = meter.meters()
        status = meter.status()
        usage = meter.usage("bytes_transferred", from_="2026-03-01T00:00:00Z", to=datetime(2026, 4, 1, tzinfo=UTC),
                            window="month", group_by="customer_id", tz="Europe/Berlin")  # fmt: skip
        march_range = {"from_": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}
        only_a = meter.usage("bytes_transferred", **march_range, filters={"customer_id": "a"})
        a_and_b = meter.usage("bytes_transferred", **march_range, filters={"customer_id": ["a", "b"]})
        with pytest.raises(InvalidRequest, match="planet"):
            meter.usage("bytes_transferred", **march_range, filters={"planet": "mars"})
        with pytest.raises(InvalidRequest, match="status"):
            meter.invoices(status="paid")
    assert [(i.customer_id, i.status, i.total) for i in invoices] == [
        ("a", "draft", Decimal("20.94")),
        ("b", "draft", Decimal("31.68")),
    ]
    assert [i.customer_id for i in only_b] == ["b"]
    assert all(isinstance(line.amount, Decimal) for i in invoices for line in i.lines)
    assert {m.slug for m in meters} >= {"api_calls", "bytes_transferred"}
    assert isinstance(status, IngestStatus) and status.events.stored == 11 and status.events.balanced
    assert usage.tz == "Europe/Berlin" and {r.customer_id for r in usage.data} == {"a", "b"}
    assert all(isinstance(r.value, int | Decimal) for r in usage.data)
    by_customer = {r.customer_id: r.value for r in usage.data}
    assert [r.value for r in only_a.data] == [by_customer["a"]]
    assert [r.value for r in a_and_b.data] == [by_customer["a"] + by_customer["b"]]


def test_flush_waits_for_what_was_tracked_before_it_while_others_keep_tracking(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    stop = threading.Event()
    with MeterClient(gateway_url, admin_key, batch_size=50, flush_interval=0.05) as meter:

        def busy() -> None:
            while not stop.is_set():
                meter.track("api_call", "busy", PROPS)
                time.sleep(0.0005)

        other = threading.Thread(target=busy)
        other.start()
        try:
            time.sleep(0.3)
            mine = [meter.track("api_call", "mine", PROPS) for _ in range(5)]
            started = time.monotonic()
            meter.flush()
            took = time.monotonic() - started
        finally:
            stop.set()
            other.join(30)
    assert took < 5
    run_drain(nats_server.url, database_url, catalog)
    stored = {r[0] for r in query(database_url, "SELECT id FROM usage_events WHERE customer_id = 'mine'")}
    assert stored == set(mine)


def test_batches_too_large_for_the_gateway_are_halved_and_refused_keys_rejected(
    settings, catalog, clean, admin_key, nats_server, database_url
):
    from dataclasses import replace

    from meter_platform.access import create_key
    from meter_platform.sdk import PayloadTooLarge, PermissionDenied
    from meter_platform.storage import db

    gateway = GatewayThread(replace(settings, max_body_bytes=20_000), catalog).start()
    big = {**PROPS, "endpoint": "/v1/" + "x" * 700}  # about 1 KB an event: 100 of them make a 413
    try:
        with MeterClient(gateway.url, admin_key, batch_size=100) as meter:
            ids = [meter.track("api_call", "big", big) for _ in range(100)]
            meter.flush()
            assert meter.take_size() < 100  # later batches stay small enough
            with pytest.raises(PayloadTooLarge):  # send() does not split: one request, refused
                meter.send([{"event_type": "api_call", "customer_id": "big", "properties": big}] * 30)
        with db.connect(database_url) as conn:
            _, reader = create_key(conn, ["read"], name="reader")
            conn.commit()
        reported = []
        meter = MeterClient(gateway.url, reader, on_error=lambda e, ev: reported.append((e, len(ev))))
        for _ in range(3):
            meter.track("api_call", "big", PROPS)
        with pytest.raises(RejectedEvents) as caught:
            meter.close()
    finally:
        gateway.stop()
    (rejection,) = caught.value.rejections
    assert isinstance(rejection.error, PermissionDenied) and len(rejection.events) == 3
    assert [(type(e), n) for e, n in reported] == [(PermissionDenied, 3)]
    run_drain(nats_server.url, database_url, catalog)
    assert sorted(r[0] for r in query(database_url, "SELECT id FROM usage_events")) == sorted(ids)
