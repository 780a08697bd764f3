"""Events as the SDK sends them: ids made client-side (UUIDv7), timestamps in RFC 3339 UTC with
microseconds, and each event encoded once, when it is tracked, so a retry sends the very same bytes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

# Decimal as a JSON number with exactly its digits (the gateway keeps exact decimals).
_encoder = msgspec.json.Encoder(decimal_format="number")
_uuid_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits; ids sort by creation time.

    Within one millisecond, a 12-bit counter (seeded randomly) keeps ids made by this process in order.
    """
    global _last_ms, _counter
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _counter = ms, int.from_bytes(os.urandom(2)) & 0x7FF
        else:  # the same millisecond (or the clock stepped back): count on, in the last one seen
            _counter += 1
            if _counter > 0xFFF:
                _last_ms, _counter = _last_ms + 1, 0
            ms = _last_ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _canonical(value: str) -> bool:
    """Already ``YYYY-MM-DDTHH:MM:SS.ffffffZ``? (Then only its validity needs checking.)"""
    return len(value) == 27 and value[10] == "T" and value[19] == "." and value[26] == "Z"


def format_timestamp(value: datetime | str) -> str:
    """RFC 3339 in UTC with microseconds (``2025-07-24T10:30:45.123456Z``).

    Accepts an aware ``datetime`` or an RFC 3339 string with an offset; a naive datetime or a string
    without an offset is refused (ValueError): the SDK will not guess a time zone.
    """
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"timestamp {value!r} is not RFC 3339 (like 2025-07-24T10:30:45.123456Z)"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError(f"timestamp {value!r} needs a date, a time and an offset (Z or +hh:mm)")
        if _canonical(value):  # the common case, and the hot path of big batches: nothing to redo
            return value
        value = parsed
    elif not isinstance(value, datetime):
        raise TypeError(f"timestamp must be a datetime or an RFC 3339 string, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"timestamp {value.isoformat()} is naive: give it a time zone (datetime.now(UTC), not datetime.now())"
        )
    # isoformat is several times faster than strftime; in UTC its offset is always "+00:00".
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class Encoded(NamedTuple):
    """One event ready to send: its id and its JSON object."""

    id: str
    raw: bytes

    def decoded(self) -> dict[str, Any]:
        """The event as a dict again (for error reports)."""
        return msgspec.json.decode(self.raw)


def _optional_mapping(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a JSON object) or None, not {type(value).__name__}")


def make_event(
    event_type: str,
    customer_id: str,
    properties: Mapping[str, Any] | None = None,
    id: str | None = None,
    timestamp: datetime | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Encoded:
    """Check and encode one tracked event; the id defaults to a UUIDv7, the timestamp to now.

    ``track`` calls this at once, so a mistake is raised where it was made, not in a background flush.
    """
    for name, value in (("event_type", event_type), ("customer_id", customer_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    if id is not None and (not isinstance(id, str) or not id):
        raise ValueError(f"id must be a non-empty string or None, not {id!r}")
    _optional_mapping("properties", properties)
    _optional_mapping("metadata", metadata)
    event: dict[str, Any] = {
        "id": id or uuid7(),
        "event_type": event_type,
        "customer_id": customer_id,
        "timestamp": format_timestamp(timestamp if timestamp is not None else datetime.now(UTC)),
        "properties": dict(properties or {}),
    }
    if metadata:
        event["metadata"] = dict(metadata)
    return Encoded(event["id"], _encoder.encode(event))


def _normalized(event: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """An event given to ``send``, with an id and a normalized timestamp (the same dict when it had both)."""
    if type(event) is not dict and not isinstance(event, Mapping):  # a dict's check is the cheap one
        raise TypeError(f"an event must be a mapping, not {type(event).__name__}")
    event_id, ts = event.get("id"), event.get("timestamp")
    if event_id is not None and (not isinstance(event_id, str) or not event_id):
        raise ValueError(f"id must be a non-empty string or None, not {event_id!r}")
    timestamp = format_timestamp(ts if ts is not None else datetime.now(UTC))
    if event_id is not None and timestamp is ts:
        return event_id, event  # nothing to add or change: no copy
    out = dict(event)
    out["id"] = event_id = event_id or uuid7()
    out["timestamp"] = timestamp
    return event_id, out


def prepare_batch(events: Iterable[Mapping[str, Any]]) -> tuple[list[str], bytes]:
    """The ids and the JSON array body of events given to ``send``: an id and a timestamp are added
    when missing, the timestamp normalized; the other fields go as given (the gateway's 400 names what
    is wrong). Encoded in one call: big batches are the hot path."""
    ids, batch = [], []
    for event in events:
        event_id, out = _normalized(event)
        ids.append(event_id)
        batch.append(out)
    return ids, _encoder.encode(batch)


def batch_body(events: list[Encoded]) -> bytes:
    """The JSON array body of one request."""
    return b"[" + b",".join(e.raw for e in events) + b"]"
