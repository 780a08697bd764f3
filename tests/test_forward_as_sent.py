"""Events forwarded as their sender wrote them: the message holds the request's own JSON array, and
the pipeline reads exactly the events the gateway checked (no server needed)."""

from __future__ import annotations

import time
import uuid

from meter_platform.capture.envelope import (
    GatewayBatch,
    decode_batch,
    decode_events,
    encode_batch,
    forward_as_sent,
    new_event_id,
    sent_unchanged,
)
from meter_platform.capture.messages import EventRows, Message, Rejected, decode_message
from meter_platform.config import BATCH_HEADER, GATEWAY_SUBJECT

BODY = (
    b'[ {"id": "a-1", "event_type": "api_call", "customer_id": "c1", "timestamp": "2026-11-28T10:00:00.000001Z",'
    b' "properties": {"n": 1.5, "big": 12345678901234567, "deep": {"x": [1, {"y": null}]}}, "extra": true},\n'
    b' {"customer_id": "c2", "event_type": "api_call", "id": "a-2", "timestamp": "2026-11-28T10:00:01.000000Z",'
    b' "metadata": {"sdk": "t"}} ]'
)


def _events() -> list:
    events, errors, was_array = decode_events(BODY)
    assert errors == [] and was_array
    return events


def test_a_forwarded_batch_carries_the_body_and_reads_as_the_encoded_one():
    plain = encode_batch(GatewayBatch(received_at=7, events=_events()))
    events = _events()
    assert sent_unchanged(events)
    forward_as_sent(events, BODY)
    sent = encode_batch(
        GatewayBatch(received_at=7, events=list(events))
    )  # a copy of the list still qualifies
    assert BODY in sent and sent != plain
    assert decode_batch(sent) == decode_batch(plain)
    rows = []
    for data in (plain, sent):
        got, bad = EventRows(), list[Rejected]()
        decode_message(Message(1, GATEWAY_SUBJECT, data, {BATCH_HEADER: "1"}, 7), got, bad, {})
        assert bad == []
        rows.append(got)
    assert rows[0] == rows[1] and rows[0].ids == ["a-1", "a-2"]


def test_only_exactly_the_request_is_forwarded():
    events = _events()
    forward_as_sent(events, BODY)
    part = encode_batch(GatewayBatch(received_at=7, events=events[:1]))
    assert BODY not in part and decode_batch(part).events == events[:1]
    grouped = encode_batch(GatewayBatch(received_at=7, events=events, spans=[(1, 7), (1, 8)]))
    assert BODY not in grouped and decode_batch(grouped).spans == [(1, 7), (1, 8)]
    other = _events()[:1] + events[1:]  # same length and last event, another first one: no note
    assert BODY not in encode_batch(GatewayBatch(received_at=7, events=other))


def test_events_the_gateway_changes_are_not_sent_unchanged():
    no_id = decode_events(
        b'{"event_type": "a", "customer_id": "c", "timestamp": "2026-11-28T10:00:00.000001Z"}'
    )
    no_time = decode_events(b'{"event_type": "a", "customer_id": "c", "id": "x"}')
    offset = decode_events(
        b'{"event_type": "a", "customer_id": "c", "id": "x", "timestamp": "2026-11-28T11:00:00+01:00"}'
    )
    for events, _, _ in (no_id, no_time, offset):
        assert not sent_unchanged(events)


def test_ids_the_gateway_makes_are_uuid7_in_arrival_order():
    ids = [new_event_id() for _ in range(200)]
    for made in ids:
        parsed = uuid.UUID(made)
        assert str(parsed) == made and parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert len(set(ids)) == len(ids)
    later = new_event_id()
    time.sleep(0.002)
    assert new_event_id()[:13] > later[:13]  # the millisecond timestamp leads
