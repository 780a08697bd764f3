"""The SDK's pure parts: ids, timestamps, events checked where they are tracked, retry waits, the key."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from meter_platform.sdk import RetryPolicy, format_timestamp, resolve_api_key, uuid7
from meter_platform.sdk.buffer import EventBuffer
from meter_platform.sdk.errors import BufferFull
from meter_platform.sdk.events import make_event, prepare_batch
from meter_platform.sdk.retry import parse_retry_after


def test_ids_are_uuid7_unique_and_in_creation_order():
    ids = [uuid7() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    ms = int(ids[-1].replace("-", "")[:12], 16)
    assert abs(ms / 1000 - datetime.now(UTC).timestamp()) < 5


def test_timestamps_go_out_in_utc_with_microseconds():
    berlin = timezone(timedelta(hours=2))
    assert (
        format_timestamp(datetime(2025, 7, 24, 12, 30, 45, 123456, tzinfo=berlin))
        == "2025-07-24T10:30:45.123456Z"
    )
    assert format_timestamp("2025-07-24T12:30:45+02:00") == "2025-07-24T10:30:45.000000Z"
    assert format_timestamp("2025-07-24T10:30:45.123456789Z") == "2025-07-24T10:30:45.123456Z"
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(datetime(2025, 7, 24, 10, 30))
    with pytest.raises(ValueError, match="offset"):
        format_timestamp("2025-07-24T10:30:45")
    with pytest.raises(ValueError, match="RFC 3339"):
        format_timestamp("yesterday")


def test_an_event_is_checked_and_encoded_when_tracked():
    event = make_event("api_call", "c1", {"gb": Decimal("0.10"), "n": 3}, metadata={"ua": "x"})
    body = msgspec.json.decode(event.raw)
    assert body["id"] == event.id and uuid.UUID(event.id).version == 7
    assert body["properties"] == {"gb": 0.10, "n": 3} and b'"gb":0.10' in event.raw  # exact digits
    assert datetime.now(UTC) - datetime.fromisoformat(body["timestamp"]) < timedelta(seconds=5)
    assert make_event("api_call", "c1", id="mine").id == "mine"
    for bad in (("", "c1"), ("api_call", ""), ("api_call", None)):
        with pytest.raises(ValueError):
            make_event(*bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="properties"):
        make_event("api_call", "c1", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make_event("api_call", "c1", {"x": object()})  # not JSON: refused here, not in a background flush
    with pytest.raises(ValueError, match="naive"):
        make_event("api_call", "c1", timestamp=datetime(2025, 1, 1))


def test_send_keeps_the_events_fields_and_adds_id_and_timestamp():
    given = {"event_type": "x", "customer_id": "c", "timestamp": "2025-07-24T12:30:45+02:00", "extra": 1}
    canonical = {
        "event_type": "x",
        "customer_id": "c",
        "id": "e2",
        "timestamp": "2025-07-24T10:30:45.000000Z",
    }
    ids, body = prepare_batch([given, canonical])
    assert uuid.UUID(ids[0]).version == 7 and ids[1] == "e2"
    assert msgspec.json.decode(body) == [
        {**given, "id": ids[0], "timestamp": "2025-07-24T10:30:45.000000Z"},
        canonical,
    ]
    assert "id" not in given  # the caller's mapping is not changed
    with pytest.raises(ValueError, match="offset"):
        prepare_batch([{**canonical, "timestamp": "2025-07-24T10:30:45"}])


def test_retry_waits_grow_with_jitter_and_honour_retry_after():
    policy = RetryPolicy(budget=10, initial_backoff=0.1, max_backoff=2.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (10, 2.0)):
        waits = {policy.delay(attempt, None) for _ in range(50)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits) and len(waits) > 1
    assert policy.delay(1, 3.0) == 3.0
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None
    in_a_minute = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 55 < (parse_retry_after(in_a_minute) or 0) <= 60


def test_a_full_buffer_waits_then_raises_and_keeps_what_it_holds():
    buffer = EventBuffer(2)
    for _ in range(2):
        buffer.put(make_event("x", "c"), timeout=0)
    with pytest.raises(BufferFull):
        buffer.put(make_event("x", "c"), timeout=0.05)
    batch = buffer.take(5)
    assert (len(batch), buffer.inflight, len(buffer)) == (2, 2, 2)  # in flight still takes room
    buffer.requeue(batch)
    assert buffer.snapshot() == batch
    assert not buffer.settled_through(1)
    buffer.done(buffer.take(1))
    assert buffer.settled_through(1) and not buffer.settled_through(2)
    buffer.put(make_event("x", "c"), timeout=0)  # room again
    assert len(buffer) == 2 and buffer.last_seq == 3


def test_the_key_comes_from_the_argument_the_environment_or_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METER_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    (tmp_path / ".meter").mkdir()
    (tmp_path / ".meter" / "api-key").write_text("mk_live_from_file\n")
    assert resolve_api_key(None) == "mk_live_from_file"
    monkeypatch.setenv("METER_API_KEY", "mk_live_from_env")
    assert resolve_api_key(None) == "mk_live_from_env"
    assert resolve_api_key("mk_live_given") == "mk_live_given"
