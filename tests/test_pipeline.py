"""The micro-batch writer against real JetStream and PostgreSQL: dedup, quarantine, crash recovery."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from meter_platform.capture import jetstream
from meter_platform.config import CONSUMER_NAME, STREAM_NAME, DrainSettings
from tests.helpers import RECENT, api_call, backlog, publish, query, run_drain, scalar

pytestmark = pytest.mark.usefixtures("clean")


def totals(database_url: str) -> tuple[int, int, int, int]:
    """(events, stored, duplicates, quarantined) over the whole ledger."""
    row = query(
        database_url,
        "SELECT coalesce(sum(events),0), coalesce(sum(stored),0), "
        "coalesce(sum(duplicates),0), coalesce(sum(quarantined),0) FROM ingest_messages",
    )[0]
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def api_calls_count(database_url: str) -> int:
    return int(
        scalar(
            database_url,
            "SELECT coalesce(sum(event_count), 0) FROM usage_minute_aggregates"
            " WHERE meter_slug = 'api_calls'",
        )
    )


def test_direct_publish_is_stored_and_aggregated(nats_server, database_url, catalog):
    publish(nats_server.url, api_call("a1", bytes_transferred=100))
    publish(
        nats_server.url,
        [
            api_call("a2", bytes_transferred=50, region="eu-west-1"),
            api_call("a3", customer="c2", bytes_transferred=7),
        ],
    )
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.messages, counts.events, counts.stored, counts.duplicates, counts.quarantined) == (
        2,
        3,
        3,
        0,
        0,
    )
    rows = query(
        database_url,
        "SELECT customer_id, dims, event_count, value_sum FROM usage_minute_aggregates"
        " WHERE meter_slug = 'bytes_transferred' ORDER BY customer_id, dims->>'region'",
    )
    assert rows == [
        ("c1", {"region": "eu-west-1"}, 1, Decimal(50)),
        ("c1", {"region": "us-east-1"}, 1, Decimal(100)),
        ("c2", {"region": "us-east-1"}, 1, Decimal(7)),
    ]
    minute = scalar(database_url, "SELECT DISTINCT minute FROM usage_minute_aggregates")
    assert minute == RECENT.replace(second=0, microsecond=0)
    ts = scalar(database_url, "SELECT ts FROM usage_events WHERE id = 'a1'")
    assert ts.microsecond == 123456
    assert backlog(nats_server.url).ack_floor == 2


def test_same_id_twice_in_one_batch_counts_once(nats_server, database_url, catalog):
    publish(nats_server.url, [api_call("dup"), api_call("dup"), api_call("other")])
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates) == (3, 2, 1)
    assert api_calls_count(database_url) == 2


def test_same_id_across_batches_counts_once(nats_server, database_url, catalog):
    publish(nats_server.url, api_call("x1"))
    run_drain(nats_server.url, database_url, catalog)
    publish(nats_server.url, [api_call("x1"), api_call("x2")])
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates) == (2, 1, 1)
    assert api_calls_count(database_url) == 2
    assert totals(database_url) == (3, 2, 1, 0)


def test_resend_after_jetstream_duplicate_window_still_counted_once(nats_server, database_url, catalog):
    async def shorten_window() -> None:
        nc = await jetstream.connect(nats_server.url, name="tests")
        config = jetstream.stream_config()
        config.duplicate_window = 1.0
        await nc.jetstream().update_stream(config)
        await nc.close()

    asyncio.run(shorten_window())
    publish(nats_server.url, api_call("late-resend"), msg_id="late-resend")
    publish(nats_server.url, api_call("late-resend"), msg_id="late-resend")  # inside the window: dropped
    assert backlog(nats_server.url).last_seq == 1
    asyncio.run(asyncio.sleep(1.5))
    publish(nats_server.url, api_call("late-resend"), msg_id="late-resend")  # window passed: stored again
    assert backlog(nats_server.url).last_seq == 2
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates) == (2, 1, 1)
    assert api_calls_count(database_url) == 1


def _short_ack_wait(url: str) -> None:
    async def update() -> None:
        nc = await jetstream.connect(url, name="tests")
        config = jetstream.consumer_config()
        config.ack_wait = 1.0
        await nc.jetstream().add_consumer(STREAM_NAME, config)
        await nc.close()

    asyncio.run(update())


def test_crash_between_commit_and_ack_redelivers_without_doubling(nats_server, database_url, catalog):
    _short_ack_wait(nats_server.url)
    publish(nats_server.url, [api_call("k1"), api_call("k2")])
    publish(nats_server.url, api_call("k3", bytes_transferred=10))
    with pytest.raises(RuntimeError, match="between commit and ack"):
        run_drain(nats_server.url, database_url, catalog, crash_after_commit=True)
    # Committed, but not acked: JetStream still holds the messages.
    assert scalar(database_url, "SELECT count(*) FROM usage_events") == 3
    state = backlog(nats_server.url)
    assert state.ack_floor == 0 and state.messages == 2
    asyncio.run(asyncio.sleep(1.5))  # past ack_wait: JetStream redelivers
    counts = run_drain(nats_server.url, database_url, catalog)
    assert counts.redelivered == 2 and counts.stored == 0 and counts.events == 0
    assert api_calls_count(database_url) == 3
    assert scalar(
        database_url,
        "SELECT sum(value_sum) FROM usage_minute_aggregates WHERE meter_slug = 'bytes_transferred'",
    ) == Decimal(2048 * 2 + 10)
    assert totals(database_url) == (3, 3, 0, 0)
    state = backlog(nats_server.url)
    assert state.ack_floor == 2 and state.messages == 0


def test_crash_before_commit_loses_nothing(nats_server, database_url, catalog, monkeypatch):
    _short_ack_wait(nats_server.url)
    publish(nats_server.url, [api_call("p1"), api_call("p2")])
    from meter_platform.ingestion import writer as pipeline

    original = pipeline.MicroBatchWriter._commit

    def fail_inside_transaction(self, *args, **kwargs):
        # Let the inserts run, then fail before COMMIT: the transaction must roll back whole.
        conn = self.connection()
        with conn.transaction():
            conn.execute(
                "INSERT INTO usage_events (id, event_type, customer_id, ts, received_at, stream_seq)"
                " VALUES ('p1', 'api_call', 'c1', now(), now(), 1)"
            )
            raise RuntimeError("killed before commit")

    monkeypatch.setattr(pipeline.MicroBatchWriter, "_commit", fail_inside_transaction)
    with pytest.raises(RuntimeError, match="before commit"):
        run_drain(nats_server.url, database_url, catalog)
    assert scalar(database_url, "SELECT count(*) FROM usage_events") == 0
    monkeypatch.setattr(pipeline.MicroBatchWriter, "_commit", original)
    asyncio.run(asyncio.sleep(1.5))
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored) == (2, 2)
    assert api_calls_count(database_url) == 2


def test_nats_restart_with_pending_messages_loses_nothing(nats_server, database_url, catalog):
    for i in range(20):
        publish(nats_server.url, [api_call(f"r{i}-{j}") for j in range(5)])
    assert backlog(nats_server.url).messages == 20
    nats_server.restart()
    state = backlog(nats_server.url)
    assert state.messages == 20 and state.pending == 20
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.messages, counts.events, counts.stored) == (20, 100, 100)
    assert api_calls_count(database_url) == 100


def test_invalid_events_are_quarantined_with_reasons(nats_server, database_url, catalog):
    publish(
        nats_server.url,
        [
            api_call("ok"),
            api_call("bad-method", method="FETCH"),
            api_call("bad-bytes", bytes_transferred="lots"),
            api_call("neg-bytes", bytes_transferred=-1),
            {"id": "no-customer", "event_type": "api_call", "properties": {"endpoint": "/x"}},
            {"id": "unknown", "event_type": "teleport", "customer_id": "c1"},
            {"id": "no-endpoint", "event_type": "api_call", "customer_id": "c1", "properties": {}},
        ],
    )
    publish(nats_server.url, b"this is not json")
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.quarantined) == (8, 1, 7)
    reasons = dict(query(database_url, "SELECT coalesce(event_id, '(raw)'), reasons FROM quarantined_events"))
    assert reasons["bad-method"] == [
        {
            "field": "properties.method",
            "reason": "enum",
            "message": "must be one of GET, POST, PUT, PATCH, DELETE",
        }
    ]
    assert reasons["bad-bytes"][0]["reason"] == "type"
    assert reasons["neg-bytes"][0]["reason"] == "min"
    assert reasons["no-customer"][0] == {
        "field": "customer_id",
        "reason": "invalid_envelope",
        "message": reasons["no-customer"][0]["message"],
    }
    assert reasons["unknown"][0]["reason"] == "unknown_event_type"
    assert reasons["no-endpoint"] == [
        {"field": "properties.endpoint", "reason": "required", "message": "is required"}
    ]
    assert reasons["(raw)"][0]["reason"] == "not_json"
    assert api_calls_count(database_url) == 1
    # A resend of a quarantined event is a duplicate, not a second quarantine row.
    publish(nats_server.url, api_call("bad-method", method="FETCH"))
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.duplicates, counts.quarantined) == (1, 0)


def test_ledger_balances_per_message(nats_server, database_url, catalog):
    publish(nats_server.url, [api_call("l1"), api_call("l1"), api_call("l2", method="NOPE")])
    publish(nats_server.url, api_call("l1"))
    run_drain(nats_server.url, database_url, catalog)
    rows = query(
        database_url,
        "SELECT stream_seq, events, stored, duplicates, quarantined FROM ingest_messages ORDER BY 1",
    )
    assert rows == [(1, 3, 1, 1, 1), (2, 1, 0, 1, 0)]
    info = asyncio.run(_consumer_ack_floor(nats_server.url))
    assert info == 2


async def _consumer_ack_floor(url: str) -> int:
    nc = await jetstream.connect(url, name="tests")
    try:
        info = await nc.jetstream().consumer_info(STREAM_NAME, CONSUMER_NAME)
        return info.ack_floor.stream_seq
    finally:
        await nc.close()


def test_late_events_are_quarantined_as_too_late_and_old_windows_still_count(
    nats_server, database_url, catalog
):
    from datetime import UTC, datetime, timedelta

    def ts(days: float) -> str:
        return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    publish(
        nats_server.url, [api_call("late-ok", ts=ts(34)), api_call("too-late", ts=ts(36)), api_call("now")]
    )
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.stored, counts.quarantined) == (2, 1)
    assert query(database_url, "SELECT event_id, reasons->0->>'reason' FROM quarantined_events") == [
        ("too-late", "too_late")
    ]
    # The late one lands in its own (old) minute, not in the current one.
    minutes = query(
        database_url, "SELECT minute FROM usage_minute_aggregates WHERE meter_slug = 'api_calls' ORDER BY 1"
    )
    assert len(minutes) == 2 and minutes[0][0] < datetime.now(UTC) - timedelta(days=33)


def test_nul_characters_published_straight_to_nats_are_quarantined_not_wedging(
    nats_server, database_url, catalog
):
    publish(
        nats_server.url,
        [
            api_call("nul-ok"),
            {"id": "nul\u0000id", "event_type": "api_call", "customer_id": "c1"},
            {"event_type": "api_call", "customer_id": "c\u0000", "id": "nul-cust"},
        ],
    )
    publish(
        nats_server.url, b'{"event_type": "api_call", "customer_id": "c1", "properties": {"k": "\\u0000"}}'
    )
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.quarantined) == (4, 1, 3)
    assert backlog(nats_server.url).ack_floor == 2


def test_a_recreated_stream_restarting_at_sequence_1_loses_nothing(nats_server, database_url, catalog):
    """The ledger keys messages by stream incarnation: the new stream's message 1 is not mistaken for
    the old stream's message 1 (which would skip its events)."""
    publish(nats_server.url, [api_call("old-1"), api_call("old-2")])
    run_drain(nats_server.url, database_url, catalog)
    asyncio.run(_recreate_stream(nats_server.url))  # the database keeps its ledger
    publish(nats_server.url, [api_call("new-1"), api_call("new-2"), api_call("old-1")])
    assert backlog(nats_server.url).last_seq == 1
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.messages, counts.redelivered, counts.stored, counts.duplicates) == (1, 0, 2, 1)
    assert api_calls_count(database_url) == 4
    assert scalar(database_url, "SELECT count(DISTINCT stream_created) FROM ingest_messages") == 2


async def _recreate_stream(url: str) -> None:
    nc = await jetstream.connect(url, name="tests")
    js = nc.jetstream()
    await js.delete_stream(STREAM_NAME)
    await jetstream.ensure_stream_and_consumer(js)
    await nc.close()


def test_two_runs_draining_at_once_count_everything_once(nats_server, database_url, catalog):
    """Two runs share the consumer (the sensor allows it under load): their upserts of the same
    aggregate rows serialize or retry, and each event is counted once."""
    import threading

    for m in range(120):
        # the same customers, minute and dimensions in every message: maximal row contention
        publish(nats_server.url, [api_call(f"p{m}-{i}", customer=f"c{i % 3}") for i in range(25)])
    small = DrainSettings(batch_size=3, fetch_timeout=0.3, max_seconds=60, idle_seconds=0.6)
    results: list = []
    runs = [
        threading.Thread(
            target=lambda: results.append(run_drain(nats_server.url, database_url, catalog, settings=small))
        )
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert len(results) == 2 and all(r.batches > 0 for r in results), "both runs drained"
    assert sum(r.messages for r in results) == 120 and sum(r.stored for r in results) == 3000
    assert api_calls_count(database_url) == 3000
    assert totals(database_url) == (3000, 3000, 0, 0)
