"""The JetStream message format, read in one place.

A message on the stream is either a gateway batch (header ``Meter-Batch``: one msgpack/JSON
``GatewayBatch`` with the receive time and events whose ids and timestamps the gateway filled in) or
an event published straight to NATS (one JSON object or an array; header ``Nats-Msg-Id`` optional).
:func:`decode_message` turns either into columns of events (:class:`EventRows`) and rejections
(:class:`Rejected`); a signed webhook delivery the gateway could not map (header ``Meter-Unmapped``:
its id and reasons; the body is the raw delivery) is one rejection. The micro-batch writer and the gateway's lookup of pending events both use it, so an
event gets the same id wherever it is read (an event published without one: the message's
``Nats-Msg-Id`` when it is alone in the message, else ``nats-<stream seq>-<index>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from meter_platform.capture.envelope import (
    MAX_FUTURE_SKEW,
    Event,
    convert_event,
    datetime_to_us,
    decode_any,
    decode_batch,
    format_timestamp,
    now_us,
    parse_timestamp,
    receive_times,
    us_to_datetime,
)
from meter_platform.config import BATCH_HEADER


@dataclass(frozen=True)
class Failure:
    """Why one event failed validation."""

    field: str
    reason: str
    message: str

    def as_json(self) -> dict[str, str]:
        """The failure as stored in ``quarantined_events.reasons``."""
        return {"field": self.field, "reason": self.reason, "message": self.message}


#: The stream incarnation of messages whose stream's creation time is not known (tests, tools).
STREAM_CREATED_UNKNOWN = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Message:
    """A JetStream message as the pipeline needs it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    timestamp_us: int  # when JetStream stored it
    # When the stream was created: sequences restart at 1 in a stream created again.
    stream_created: datetime = STREAM_CREATED_UNKNOWN


@dataclass
class EventRows:
    """The batch's events in columns, as written to PostgreSQL."""

    ids: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    customer_ids: list[str] = field(default_factory=list)
    # The gateway's timestamps arrive normalized (UTC, microseconds) and go to PostgreSQL as text;
    # those of directly published events are parsed here, to check them.
    timestamps: list[datetime | str] = field(default_factory=list)
    received: list[datetime] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)

    def append(self, event: Event, event_id: str, ts: datetime | str, received: datetime, seq: int) -> None:
        """Add one event whose envelope was checked."""
        self.ids.append(event_id)
        self.event_types.append(event.event_type)
        self.customer_ids.append(event.customer_id)
        self.timestamps.append(ts)
        self.received.append(received)
        self.properties.append(event.properties)
        self.metadata.append(event.metadata)
        self.seqs.append(seq)


@dataclass(kw_only=True)
class Rejected:
    """An event (or an unreadable message) that failed a check, with the reasons."""

    event_id: str | None
    event_type: str | None
    customer_id: str | None
    received: datetime
    reasons: list[Failure]
    seq: int
    ts: datetime | str | None = None
    payload: Any = None  # the item as received (None: the message was not JSON)
    payload_text: str | None = None  # the raw message, when it was not JSON


def _text_field(item: Any, name: str) -> str | None:
    value = item.get(name) if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


def decode_item(
    item: Any, received: datetime, seq: int, fallback: str, rows: EventRows, bad: list[Rejected]
) -> bool:
    """Check one event as directly published (a JSON value) and append it to ``rows`` or ``bad``.

    The envelope is checked as the gateway checks it at its door, and a timestamp more than
    ``MAX_FUTURE_SKEW`` after ``received`` is refused; ``fallback`` is the id of an event sent
    without one. Returns whether the event went to ``rows``. Used for messages published straight to
    NATS and for events replayed from quarantine.
    """
    event, error = convert_event(item)
    if event is None or error is not None:
        raw_id = _text_field(item, "id")
        failure = Failure(
            error.field if error else "", "invalid_envelope", error.message if error else "invalid"
        )
        bad.append(
            Rejected(
                event_id=raw_id if raw_id and len(raw_id) <= 128 else None,
                event_type=_text_field(item, "event_type"),
                customer_id=_text_field(item, "customer_id"),
                received=received,
                payload=item,
                reasons=[failure],
                seq=seq,
            )
        )
        return False
    event_id = event.id or fallback

    def reject(failure: Failure, ts: datetime | None = None) -> bool:
        bad.append(
            Rejected(
                event_id=event_id,
                event_type=event.event_type,
                customer_id=event.customer_id,
                ts=ts,
                received=received,
                payload=item,
                reasons=[failure],
                seq=seq,
            )
        )
        return False

    ts = received
    if event.timestamp is not None:
        try:
            ts = parse_timestamp(event.timestamp)
        except ValueError as exc:  # RFC 3339 in form but not a date (month 13, year 0): as the gateway says
            return reject(Failure("timestamp", "invalid_envelope", str(exc)))
        if ts > received + MAX_FUTURE_SKEW:
            ahead = "is more than 5 minutes ahead of the time JetStream stored it"
            return reject(Failure("timestamp", "future_timestamp", ahead), ts)
    rows.append(event, event_id, ts, received, seq)
    return True


#: A webhook delivery that mapped to no (or not every) event: JSON ``{"id", "event_type",
#: "received_at", "reasons"}`` in this header, the raw delivery as the message's data.
UNMAPPED_HEADER = "Meter-Unmapped"


def unmapped_rejection(msg: Message, header: str) -> Rejected:
    """The quarantined remains of an unmapped webhook delivery: its raw text with the gateway's
    reasons. Kept without a JSON payload, so a quarantine replay leaves it (and its reasons) alone:
    a webhook's body is not an event."""
    received = us_to_datetime(msg.timestamp_us)
    try:
        info = msgspec.json.decode(header)
        reasons = [Failure(str(r["field"]), str(r["reason"]), str(r["message"])) for r in info["reasons"]]
        event_id, event_type = info.get("id"), info.get("event_type")
        received = us_to_datetime(int(info["received_at"]))
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError, OverflowError):
        # Never lose a message over its header: keep it with what is known.
        reasons = [
            Failure("", "unmapped", f"an unmapped webhook delivery (unreadable header {header[:200]!r})")
        ]
        event_id, event_type = None, None
    return Rejected(
        event_id=event_id if isinstance(event_id, str) and 0 < len(event_id) <= 128 else None,
        event_type=event_type if isinstance(event_type, str) else None,
        customer_id=None,
        received=received,
        payload_text=msg.data.decode("utf-8", "replace"),
        reasons=reasons or [Failure("", "unmapped", "the delivery mapped to no event")],
        seq=msg.seq,
    )


def decode_message(
    msg: Message, rows: EventRows, bad: list[Rejected], per_msg_events: dict[int, int]
) -> None:
    """Append the message's events to ``rows`` (or ``bad``), counting them per message."""
    received = us_to_datetime(msg.timestamp_us)
    if msg.headers and UNMAPPED_HEADER in msg.headers:
        bad.append(unmapped_rejection(msg, msg.headers[UNMAPPED_HEADER]))
        per_msg_events[msg.seq] = 1
        return
    if msg.headers and BATCH_HEADER in msg.headers:
        batch = decode_batch(msg.data)
        first = 0
        for count, received_us in receive_times(batch):  # one run per request the message holds
            received = us_to_datetime(received_us)
            for ev in batch.events[first : first + count]:
                assert ev.id is not None and ev.timestamp is not None  # the gateway fills both in
                rows.append(ev, ev.id, ev.timestamp, received, msg.seq)
            first += count
        per_msg_events[msg.seq] = len(batch.events)
        return

    # Published straight to NATS: check the envelope here, as the gateway does at its door.
    try:
        decoded = decode_any(msg.data)
    except msgspec.DecodeError as exc:
        bad.append(
            Rejected(
                event_id=None,
                event_type=None,
                customer_id=None,
                received=received,
                payload_text=msg.data.decode("utf-8", "replace"),
                reasons=[Failure("", "not_json", f"the message is not valid JSON ({exc})")],
                seq=msg.seq,
            )
        )
        per_msg_events[msg.seq] = 1
        return
    items = decoded if isinstance(decoded, list) else [decoded]
    header_id = (msg.headers or {}).get("Nats-Msg-Id")
    for i, item in enumerate(items):
        # A stable id for events published without one: a redelivery then carries the same id.
        decode_item(item, received, msg.seq, fallback_id(header_id, len(items), msg.seq, i), rows, bad)
    per_msg_events[msg.seq] = len(items)


def fallback_id(header_id: str | None, items: int, seq: int, index: int) -> str:
    """The id of an event published straight to NATS without one.

    Stable across redeliveries: the message's ``Nats-Msg-Id`` when the message holds one event, else
    ``nats-<stream sequence>-<index in the message>``.
    """
    return header_id if (header_id and items == 1) else f"nats-{seq}-{index}"


def from_nats(msg: Any, stream_created: datetime) -> Message:
    """A message as nats-py delivered it (fetch or direct get), in the pipeline's terms."""
    meta = msg.metadata
    return Message(
        seq=meta.sequence.stream,
        subject=msg.subject,
        data=msg.data,
        headers=msg.headers,
        timestamp_us=datetime_to_us(meta.timestamp) if meta.timestamp else now_us(),
        stream_created=stream_created,
    )


def find_event(msg: Message, event_id: str) -> dict[str, Any] | None:
    """The event ``event_id`` in this message, as ``GET /v1/events/{id}`` shows it, or None.

    Read exactly as the micro-batch writer reads the message (:func:`decode_message`), so an event
    published without an id is found under the id the pipeline will store it with. An event that will
    be quarantined is found too (without its reasons: they are known once it is processed).
    """
    rows, bad = EventRows(), list[Rejected]()
    decode_message(msg, rows, bad, {})
    if event_id in rows.ids:
        i = rows.ids.index(event_id)
        ts = rows.timestamps[i]
        return {
            "id": event_id,
            "event_type": rows.event_types[i],
            "customer_id": rows.customer_ids[i],
            "timestamp": ts if isinstance(ts, str) else format_timestamp(ts),
            "received_at": format_timestamp(rows.received[i]),
            "properties": rows.properties[i],
            "metadata": rows.metadata[i],
        }
    for q in bad:
        if q.event_id == event_id:
            payload = q.payload if isinstance(q.payload, dict) else {}
            return {
                "id": event_id,
                "event_type": q.event_type,
                "customer_id": q.customer_id,
                "timestamp": format_timestamp(q.ts)
                if isinstance(q.ts, datetime)
                else payload.get("timestamp"),
                "received_at": format_timestamp(q.received),
                "properties": payload.get("properties", {}),
                "metadata": payload.get("metadata", {}),
            }
    return None
