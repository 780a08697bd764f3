"""The event envelope of the public contract, and the one JetStream message format of the gateway.

Both the gateway (at the door) and the pipeline (for events published straight to NATS) check events
with the functions here, so an event means the same thing whichever path it took.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import msgspec

T = TypeVar("T")

#: Events stamped more than this far ahead of the receiver's clock are refused.
MAX_FUTURE_SKEW = timedelta(minutes=5)

# RFC 3339 date-time with a mandatory offset; up to 9 fractional digits (microseconds are kept).
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
_RFC3339_RE = re.compile(RFC3339)
_FRACTION_RE = re.compile(r"\.(\d{7,9})")


class Event(msgspec.Struct, omit_defaults=True, dict=True):
    """One usage event as the contract defines it.

    ``dict=True`` lets the gateway note, beside the fields (never encoded), that a request's events
    can go on as their sender wrote them (:func:`forward_as_sent`).
    """

    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    # Checked (and normalized) by check_times at the gateway, by the pipeline for direct publishes:
    # one parse instead of a regex here and a parse there.
    timestamp: str | None = None
    properties: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


class GatewayBatch(msgspec.Struct, omit_defaults=True):
    """The payload of one gateway message: the events of one request (or, by group commit, of several
    small requests), ids and timestamps filled in.

    ``received_at`` is the gateway's receive time in microseconds since the epoch (UTC). A message that
    groups several requests also carries ``spans``: ``[events, received_at]`` per request, in order, so
    each event keeps its own request's receive time (:func:`receive_times`).
    """

    received_at: int
    events: list[Event]
    spans: list[tuple[int, int]] | None = None


def receive_times(batch: GatewayBatch) -> list[tuple[int, int]]:
    """``(events, received_at)`` runs covering every event of the batch, in order.

    Events beyond the spans (a malformed message) take the batch's ``received_at``: they are still
    stored, never lost over a bookkeeping mistake.
    """
    if not batch.spans:
        return [(len(batch.events), batch.received_at)]
    runs = list(batch.spans)
    covered = sum(n for n, _ in runs)
    if covered < len(batch.events):
        runs.append((len(batch.events) - covered, batch.received_at))
    return runs


class ItemError(msgspec.Struct):
    """A problem with one item of a request, as the contract's 400 answer lists it."""

    index: int
    field: str
    message: str


_event_decoder = msgspec.json.Decoder(Event | list[Event])
_any_decoder = msgspec.json.Decoder()
_batch_decoder = msgspec.json.Decoder(GatewayBatch)
_encoder = msgspec.json.Encoder()

#: What a body or message nested deeper than the decoders (or the checks walking it) can follow is
#: told. msgspec raises RecursionError there, not a DecodeError: caught where a body is decoded, so
#: the normal path does no extra work.
TOO_DEEP = "the JSON is nested too deeply (keep it under a few hundred levels)"
#: msgspec raises UnicodeDecodeError (not a DecodeError) for invalid UTF-8 inside a string.
BAD_UTF8 = "the body is not valid UTF-8"


def property_at(properties: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` in an event's properties (None when absent)."""
    value: Any = properties
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def now_us() -> int:
    """The current time in microseconds since the epoch."""
    return time.time_ns() // 1000


def us_to_datetime(us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def datetime_to_us(dt: datetime) -> int:
    """An aware datetime as microseconds since the epoch."""
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp(dt: datetime) -> str:
    """RFC 3339 in UTC with all six microsecond digits, e.g. ``2025-07-24T10:30:45.123000Z``."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # Not strftime: glibc writes year 99 as "99" (not RFC 3339), and it is slower on the hot path.
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f".{dt.microsecond:06d}Z"
    )


def _is_canonical(value: str) -> bool:
    """Already in format_timestamp's form (what SDKs and the demo send): no rewriting needed."""
    return len(value) == 27 and value[10] == "T" and value[19] == "." and value[26] == "Z"


def parse_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 timestamp with offset; digits beyond microseconds are truncated, not rounded.

    Truncation keeps an event in the second (and minute window) its sender stamped it in.
    Raises ValueError for anything else.
    """
    if not _RFC3339_RE.match(value):
        raise ValueError("must be an RFC 3339 timestamp with an offset, e.g. 2025-07-24T10:30:45.123Z")
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    fixed = _FRACTION_RE.sub(lambda m: "." + m.group(1)[:6], value, count=1)
    try:
        return datetime.fromisoformat(fixed.replace("z", "Z")).astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is outside years 0001-9999 once converted to UTC") from exc


def new_event_id() -> str:
    """A UUIDv7 (time-ordered, RFC 9562) as a string: ids the gateway makes sort by arrival."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68 & 0xFFF) << 64
        | 0b10 << 62
        | rand & (2**62 - 1)
    )
    h = f"{value:032x}"  # uuid.UUID's own string, without making the object (a third of the time)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_MISSING_RE = re.compile(r"^Object missing required field `([^`]+)`(?: - at `\$(.*)`)?$")
_AT_RE = re.compile(r"^(.*) - at `\$\.?([^`]*)`$")


def _explain(text: str) -> tuple[str, str]:
    """Turn a msgspec validation message into (field, readable message)."""
    missing = _MISSING_RE.match(text)
    if missing:
        return missing.group(1), "is required"
    at = _AT_RE.match(text)
    if not at:
        return "", text
    message, path = at.group(1), at.group(2)
    field = path.split("[")[0].split(".")[0]
    if field == "timestamp" and "match" in message:
        message = "must be an RFC 3339 timestamp with an offset, e.g. 2025-07-24T10:30:45.123Z"
    elif message.startswith("Expected `str` of length"):
        message = message.replace("Expected `str` of length", "must be a string of length")
    elif message.startswith("Expected `"):
        message = "must be " + message.removeprefix("Expected ").replace("`", "").replace(", got ", ", not ")
    return field, message


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _nul_field(item: dict[str, Any]) -> str | None:
    """The first top-level field holding a NUL anywhere (PostgreSQL text and jsonb cannot)."""
    return next((str(k) for k, v in item.items() if _has_nul(k) or _has_nul(v)), None)


def _check_item(index: int, item: Any, errors: list[ItemError]) -> Event | None:
    """Convert one decoded JSON value to an Event, appending a precise error when it is not one."""
    if not isinstance(item, dict):
        errors.append(ItemError(index, "", "an event must be a JSON object"))
        return None
    nul = _nul_field(item)
    if nul is not None:
        errors.append(ItemError(index, nul, "must not contain the NUL character (U+0000)"))
        return None
    try:
        return msgspec.convert(item, Event)
    except msgspec.ValidationError as exc:
        field, message = _explain(str(exc))
        errors.append(ItemError(index, field, message))
        return None


def decode_events(body: bytes) -> tuple[list[Event | None], list[ItemError], bool]:
    """Decode a JSON body holding one event or an array of events.

    Returns ``(events, errors, was_array)``: ``events`` in request order with None where an item is
    bad, and ``errors`` listing every bad item. The fast path decodes and checks the whole body in C;
    only a body with a problem is walked item by item.
    """
    try:
        if b"\\u0000" in body:
            raise msgspec.ValidationError("NUL")
        decoded = _event_decoder.decode(body)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        return [], [ItemError(0, "", f"the body is not valid JSON ({exc})")], False
    except RecursionError:
        return [], [ItemError(0, "", TOO_DEEP)], False
    except UnicodeDecodeError:
        return [], [ItemError(0, "", BAD_UTF8)], False
    else:
        if isinstance(decoded, list):
            return list(decoded), [], True
        return [decoded], [], False
    try:
        raw = _any_decoder.decode(body)
        items = raw if isinstance(raw, list) else [raw]
        errors: list[ItemError] = []
        return [_check_item(i, item, errors) for i, item in enumerate(items)], errors, isinstance(raw, list)
    except msgspec.DecodeError as exc:  # e.g. a number out of range
        return [], [ItemError(0, "", f"the body is not valid JSON ({exc})")], False
    except RecursionError:  # decodable, but too deep for the checks that walk it
        return [], [ItemError(0, "", TOO_DEEP)], False
    except UnicodeDecodeError:
        return [], [ItemError(0, "", BAD_UTF8)], False


def decode_ndjson(body: bytes) -> tuple[list[Event | None], list[ItemError]]:
    """Decode NDJSON: one event object per line, as :func:`decode_events`; blank lines are skipped."""
    events: list[Event | None] = []
    errors: list[ItemError] = []
    index = 0
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            events.append(_check_item(index, _any_decoder.decode(line), errors))
        except msgspec.DecodeError as exc:
            errors.append(ItemError(index, "", f"line is not valid JSON ({exc})"))
            events.append(None)
        except RecursionError:
            errors.append(ItemError(index, "", TOO_DEEP))
            events.append(None)
        except UnicodeDecodeError:
            errors.append(ItemError(index, "", "line is not valid UTF-8"))
            events.append(None)
        index += 1
    return events, errors


def check_times(events: list[Event | None], received_us: int) -> list[ItemError]:
    """Normalize each event's timestamp to UTC microseconds (default: receive time); report bad ones.

    Mutates the events in place: ``timestamp`` becomes ``format_timestamp`` of the parsed instant.
    None items (already reported bad) are skipped, so indexes stay those of the request.
    """
    errors: list[ItemError] = []
    received = us_to_datetime(received_us)
    horizon = received + MAX_FUTURE_SKEW
    default: str | None = None  # made when an event needs it (most senders stamp their events)
    for i, event in enumerate(events):
        if event is None:
            continue
        if event.timestamp is None:
            event.timestamp = default = default or format_timestamp(received)
            continue
        canonical = _is_canonical(event.timestamp)
        try:
            ts = datetime.fromisoformat(event.timestamp) if canonical else parse_timestamp(event.timestamp)
        except ValueError as exc:
            message = str(exc) if not canonical else "must be an RFC 3339 timestamp with an offset"
            errors.append(ItemError(i, "timestamp", message))
            continue
        if ts > horizon:
            errors.append(ItemError(i, "timestamp", "is more than 5 minutes ahead of the gateway's clock"))
            continue
        if not canonical:
            event.timestamp = format_timestamp(ts)
    return errors


class _SentBatch(msgspec.Struct):
    """A :class:`GatewayBatch` whose events are the JSON array their sender wrote: same bytes on the wire."""

    received_at: int
    events: msgspec.Raw


#: The private attribute of a request's first event that holds its request's JSON (see forward_as_sent).
_AS_SENT = "_as_sent"


def sent_unchanged(events: list[Event]) -> bool:
    """Whether every event carries an id and a canonical timestamp: then the gateway changes nothing in
    them (:func:`check_times` keeps a canonical timestamp as it is, or refuses the request)."""
    return all(e.id is not None and e.timestamp is not None and _is_canonical(e.timestamp) for e in events)


def forward_as_sent(events: list[Event], array: bytes) -> None:
    """Note that ``events`` are exactly the JSON array ``array`` (the request body, already decoded
    into them and checked, nothing of them changed): :func:`encode_batch` then puts those bytes in the
    message instead of encoding the events again.

    The note sits on the first event and names the run it covers (its length and its last event), so
    it applies only to a batch of exactly these events in this order: a copy of the list still
    qualifies; a part of it, or several requests gathered into one message, is encoded as usual.
    The pipeline decodes the bytes with the same :class:`Event` decoder the gateway checked them with,
    so it reads the same events (fields it does not know are ignored at both ends).
    """
    if events:
        events[0].__dict__[_AS_SENT] = (array, len(events), events[-1])


def _as_sent(batch: GatewayBatch) -> bytes | None:
    """The request's own JSON array when the batch is exactly one request's events, unchanged."""
    if batch.spans or not batch.events:
        return None
    note = batch.events[0].__dict__.get(_AS_SENT)
    if note is None or note[1] != len(batch.events) or note[2] is not batch.events[-1]:
        return None
    return note[0]


def encode_batch(batch: GatewayBatch) -> bytes:
    """Serialize a gateway batch for JetStream (with more room for depth, as :func:`decode_batch`).

    Events the gateway forwards as sent (:func:`forward_as_sent`) are not encoded again: the message
    holds the request's own array beside ``received_at``, in the same JSON shape.
    """
    sent = _as_sent(batch)
    if sent is not None:
        return _encoder.encode(_SentBatch(batch.received_at, msgspec.Raw(sent)))
    try:
        return _encoder.encode(batch)
    except RecursionError:
        return _with_room(_encoder.encode, batch)


def decode_batch(data: bytes) -> GatewayBatch:
    """Parse a gateway batch message (raises msgspec errors on a malformed one).

    msgspec's nesting limit is Python's recursion limit minus the caller's stack depth: the gateway
    accepted these events at its own depth, and the batch adds two levels. So a batch the pipeline
    cannot follow from where it stands is decoded again with a little more room (the depth the
    gateway accepts is bounded by the same limit), never left as a message no one can read.
    """
    try:
        return _batch_decoder.decode(data)
    except RecursionError:
        return _with_room(_batch_decoder.decode, data)


def _with_room(work: Callable[[Any], T], arg: Any) -> T:
    """``work(arg)`` with 500 more levels of recursion (rare: only for bodies nested near the limit)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 500)
    try:
        return work(arg)
    finally:
        sys.setrecursionlimit(limit)


def decode_any(data: bytes) -> Any:
    """Parse any JSON message (directly published events); too deep is a DecodeError too."""
    try:
        return _any_decoder.decode(data)
    except RecursionError as exc:
        raise msgspec.DecodeError(TOO_DEEP) from exc
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(BAD_UTF8) from exc


def convert_event(item: Any) -> tuple[Event | None, ItemError | None]:
    """Check one directly published JSON value; returns the event or the reason it is not one."""
    errors: list[ItemError] = []
    try:
        event = _check_item(0, item, errors)
    except RecursionError:
        return None, ItemError(0, "", TOO_DEEP)
    return event, (errors[0] if errors else None)
