"""A signed webhook delivery turned into events, as its source's mapping in ``webhooks.yaml`` says.

Pure: a payload (bytes), its headers and the receive time in, events and reasons out. Each event is
checked as ``POST /v1/events`` checks one (the envelope, the timestamp), so what the gateway publishes
from a webhook means the same thing as any other event. Whatever does not map is returned as
:class:`~meter_platform.capture.messages.Failure` (reason ``unmapped``), for the quarantine.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from meter_platform.capture.envelope import (
    TOO_DEEP,
    Event,
    ItemError,
    check_times,
    decode_any,
    decode_events,
    format_timestamp,
    us_to_datetime,
)
from meter_platform.capture.messages import Failure
from meter_platform.catalog.webhooks import EventMapping, Ref, WebhookSource

#: The reason code of everything a mapping could not turn into an event.
UNMAPPED = "unmapped"
#: An event id is at most this long (the contract).
MAX_ID = 128
_MISSING: Any = object()
_encoder = msgspec.json.Encoder()
_VISIBLE = re.compile(r"[\x21-\x7e]+")
#: Unix seconds a timestamp may hold (years 1 to 9999).
_MIN_UNIX, _MAX_UNIX = -62_135_596_800, 253_402_300_799


@dataclass
class Mapped:
    """What a delivery became: valid events (ids set, timestamps normalized) and the reasons why
    anything of it did not map (``items`` is how many events it should have made)."""

    events: list[Event] = field(default_factory=list)
    problems: list[Failure] = field(default_factory=list)
    items: int = 0


def scoped(source: str, *parts: str) -> str:
    """``webhook:<source>:<parts joined by ':'>``, or ``webhook:<source>:sha256:<hex>`` when longer
    than :data:`MAX_ID` or holding anything but visible ASCII (a sender's id may hold spaces or line
    breaks; the id also travels in a NATS header). Stable: a redelivery gets the same id."""
    raw = ":".join(parts)
    scoped_id = f"webhook:{source}:{raw}"
    if len(scoped_id) <= MAX_ID and _VISIBLE.fullmatch(raw):
        return scoped_id
    return f"webhook:{source}:sha256:{hashlib.sha256(raw.encode('utf-8', 'surrogatepass')).hexdigest()}"


def event_id(source: str, delivery: str, index: int) -> str:
    """The id of the ``index``-th event of a delivery: a retried delivery makes the same ids."""
    return scoped(source, delivery, str(index))


def quarantine_id(source: str, delivery: str) -> str:
    """The id a delivery's quarantined remains are kept under (a redelivery is not kept twice)."""
    return scoped(source, delivery, "unmapped")


def walk(value: Any, path: str) -> Any:
    """The value at a dotted ``path`` (a number indexes a list), or ``_MISSING``."""
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def resolve(ref: Ref, item: Any, top: Any, header: Callable[[str], str | None]) -> Any:
    """A reference's value for one item: a constant, a header, ``$.path`` from the delivery's top
    level, or a path from the item; ``_MISSING`` when absent."""
    if ref.header is not None:
        value = header(ref.header)
        return _MISSING if value is None else value
    if ref.path is None:
        return ref.const
    if ref.path == "$":
        return top
    if ref.path.startswith("$."):
        return walk(top, ref.path[2:])
    return walk(item, ref.path)


def delivery_id(source: WebhookSource, body: bytes, header: Callable[[str], str | None]) -> str:
    """The delivery's id as the source declares it (a header, or a path in the payload); a delivery
    without one is known by its body's SHA-256, so a resend of the same body is still recognised."""
    payload: Any = None
    if source.delivery_id.path is not None:
        try:
            payload = decode_any(body)
        except msgspec.DecodeError:
            payload = None
    value = resolve(source.delivery_id, payload, payload, header)
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return "body-sha256:" + hashlib.sha256(body).hexdigest()


def map_delivery(
    source: WebhookSource, body: bytes, delivery: str, received_us: int, header: Callable[[str], str | None]
) -> Mapped:
    """Map one signed delivery to events; every reason it (or an item of it) does not map is kept."""
    out = Mapped()
    try:
        payload = decode_any(body)
    except msgspec.DecodeError as exc:
        out.items = 1
        out.problems.append(Failure("", UNMAPPED, f"the body is not JSON ({exc})"))
        return out
    mapping = source.events
    if mapping.items is None:
        items, prefix = [payload], ""
    else:
        found = walk(payload, mapping.items)
        if not isinstance(found, list) or not found:
            out.items = 1
            what = (
                "is missing" if found is _MISSING else "is an empty list" if found == [] else "is not a list"
            )
            out.problems.append(Failure(mapping.items, UNMAPPED, f"the items to fan out {what}"))
            return out
        items, prefix = found, f"{mapping.items}"
    out.items = len(items)
    meta = {"webhook_source": source.name, "webhook_delivery": delivery}
    candidates: list[tuple[str, dict[str, Any]]] = []  # (where, event object)
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]." if prefix else ""
        event = _map_item(mapping, item, payload, header, where, out.problems)
        if event is not None:
            event["id"] = event_id(source.name, delivery, index)
            event["metadata"] = meta
            candidates.append((where, event))
    if candidates:
        _check_envelopes(candidates, received_us, out)
    return out


def _check_envelopes(candidates: list[tuple[str, dict[str, Any]]], received_us: int, out: Mapped) -> None:
    """Check the mapped objects exactly as ``POST /v1/events`` checks a JSON array of events (one
    decode of the whole array in C, then the times), adding the good events and the reasons."""
    try:
        events, errors, _ = decode_events(_encoder.encode([event for _, event in candidates]))
    except RecursionError:  # the encoder's answer to very deep properties
        events, errors = [], [ItemError(0, "", TOO_DEEP)]
    if len(events) != len(candidates):  # the array as a whole failed (too deep): each item fails
        for where, _ in candidates:
            out.problems.append(
                Failure(where.rstrip("."), UNMAPPED, errors[0].message if errors else "invalid")
            )
        return
    errors += check_times(events, received_us)
    failed: set[int] = set()
    for error in errors:
        failed.add(error.index)
        where = candidates[error.index][0]
        out.problems.append(Failure((where + error.field).rstrip("."), UNMAPPED, error.message))
    out.events += [e for i, e in enumerate(events) if i not in failed and e is not None]


def _map_item(
    mapping: EventMapping,
    item: Any,
    top: Any,
    header: Callable[[str], str | None],
    where: str,
    problems: list[Failure],
) -> dict[str, Any] | None:
    """One item as an event object (before the envelope checks), or None with its reasons added."""
    before = len(problems)
    if not isinstance(item, dict):
        problems.append(Failure(where.rstrip("."), UNMAPPED, "is not a JSON object"))
        return None
    event: dict[str, Any] = {}
    for name, ref in (("event_type", mapping.event_type), ("customer_id", mapping.customer_id)):
        value = resolve(ref, item, top, header)
        if value is _MISSING or value is None:
            problems.append(Failure(where + name, UNMAPPED, f"path {ref.path!r} is missing in the payload"))
        elif isinstance(value, int) and not isinstance(value, bool):
            event[name] = str(value)  # numeric ids (e.g. a GitHub installation id) as text
        else:
            event[name] = value  # anything else is checked by the envelope
    if mapping.timestamp is not None:
        stamp = _timestamp(resolve(mapping.timestamp, item, top, header), mapping.timestamp, where, problems)
        if stamp is not None:
            event["timestamp"] = stamp
    properties = _properties(mapping, item, top, header, where, problems)
    if properties is not None:
        event["properties"] = properties
    return event if len(problems) == before else None


def _timestamp(value: Any, ref: Ref, where: str, problems: list[Failure]) -> str | None:
    """An RFC 3339 string as it is (checked with the envelope), unix seconds as RFC 3339."""
    if value is _MISSING or value is None:
        problems.append(
            Failure(where + "timestamp", UNMAPPED, f"path {ref.path!r} is missing in the payload")
        )
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not _MIN_UNIX <= value <= _MAX_UNIX:
            problems.append(
                Failure(where + "timestamp", UNMAPPED, f"{value} is not unix seconds of years 1-9999")
            )
            return None
        return _unix_text(value)
    problems.append(Failure(where + "timestamp", UNMAPPED, "must be RFC 3339 text or unix seconds"))
    return None


@functools.lru_cache(maxsize=256)
def _unix_text(value: float) -> str:
    """Unix seconds as RFC 3339 (cached: a fan-out's items often share the delivery's time)."""
    return format_timestamp(us_to_datetime(round(value * 1_000_000)))


def _properties(
    mapping: EventMapping,
    item: Any,
    top: Any,
    header: Callable[[str], str | None],
    where: str,
    problems: list[Failure],
) -> dict[str, Any] | None:
    """A path to an object (copied), or named values (an absent one is left out: the catalog's
    ``required`` decides whether that is a problem)."""
    if isinstance(mapping.properties, Ref):
        value = resolve(mapping.properties, item, top, header)
        if not isinstance(value, dict):
            what = "is missing" if value is _MISSING else "is not an object"
            problems.append(
                Failure(where + "properties", UNMAPPED, f"path {mapping.properties.path!r} {what}")
            )
            return None
        return dict(value)
    out: dict[str, Any] = {}
    for name, ref in mapping.properties.items():
        value = resolve(ref, item, top, header)
        if value is not _MISSING and value is not None:
            out[name] = value
    return out
