"""Quarantine you can work with: events that failed validation, kept with their reasons, listed and
filtered (``GET /v1/quarantine``, ``meter quarantine list``). Replaying them once the catalog is fixed is
:mod:`meter_platform.ingestion.quarantine_replay`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from meter_platform.capture.envelope import format_timestamp, parse_timestamp
from meter_platform.meters.aggregates import Bind

#: The states of a quarantined event.
STATUSES = ("quarantined", "replayed", "duplicate")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_REASON_RE = re.compile(r"^[a-z_]{1,64}$")
_LIST_PARAMS = ("reason", "event_type", "customer_id", "from", "to", "status", "limit", "offset")


#: The ledger's totals in one snapshot (no parameters; runs through psycopg or SQLAlchemy alike).
class QuarantineQueryError(ValueError):
    """The request's parameters are not usable; ``details`` lists each problem (a 400)."""

    def __init__(self, details: list[dict[str, str]]):
        super().__init__(
            f"{len(details)} query parameter(s) are invalid: "
            + "; ".join(f"{d['field']} {d['message']}" for d in details)
        )
        self.details = details


@dataclass(frozen=True)
class QuarantineFilter:
    """Which quarantined events: any of ``reasons``, an event type, a customer, a quarantine time range
    ``[start, end)`` and a status (None: any status)."""

    reasons: tuple[str, ...] = ()
    event_type: str | None = None
    customer_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    status: str | None = "quarantined"

    def where(self, params: dict[str, Any], bind: Bind) -> str:
        """The SQL condition over ``quarantined_events`` (placeholders in ``bind``'s style)."""
        where = ["TRUE"]
        if self.status is not None:
            params["q_status"] = self.status
            where.append(f"status = {bind('q_status')}")
        if self.reasons:
            any_of = []
            for i, reason in enumerate(self.reasons):
                params[f"q_reason{i}"] = json.dumps([{"reason": reason}])
                any_of.append(f"reasons @> CAST({bind(f'q_reason{i}')} AS jsonb)")
            where.append(f"({' OR '.join(any_of)})")
        if self.event_type is not None:
            params["q_event_type"] = self.event_type
            where.append(f"event_type = {bind('q_event_type')}")
        if self.customer_id is not None:
            params["q_customer"] = self.customer_id
            where.append(f"customer_id = {bind('q_customer')}")
        if self.start is not None:
            params["q_start"] = self.start
            where.append(f"quarantined_at >= {bind('q_start')}")
        if self.end is not None:
            params["q_end"] = self.end
            where.append(f"quarantined_at < {bind('q_end')}")
        return " AND ".join(where)

    def as_json(self) -> dict[str, Any]:
        """The filters that are set, as recorded in ``quarantine_replays.filters``."""
        out: dict[str, Any] = {}
        if self.reasons:
            out["reason"] = list(self.reasons)
        for name in ("event_type", "customer_id", "status"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.start is not None:
            out["from"] = format_timestamp(self.start)
        if self.end is not None:
            out["to"] = format_timestamp(self.end)
        return out


def parse_reasons(values: Iterable[str]) -> tuple[str, ...]:
    """Reason codes from repeated and/or comma-separated values; ValueError for a malformed one."""
    out: list[str] = []
    for value in values:
        for reason in (r.strip() for r in value.split(",")):
            if not reason:
                continue
            if not _REASON_RE.match(reason):
                raise ValueError(f"{reason!r} is not a reason code (e.g. enum, type, unknown_event_type)")
            if reason not in out:
                out.append(reason)
    return tuple(out)


def parse_list_params(items: Iterable[tuple[str, str]]) -> tuple[QuarantineFilter, int, int]:
    """Check the query parameters of ``GET /v1/quarantine``: (filters, limit, offset).

    Raises :class:`QuarantineQueryError` listing every bad parameter.
    """
    errors: list[dict[str, str]] = []
    values: dict[str, str] = {}
    reason_values: list[str] = []
    for name, value in items:
        if name not in _LIST_PARAMS:
            errors.append({"field": name, "message": f"is not a parameter; use {', '.join(_LIST_PARAMS)}"})
        elif "\x00" in value:
            errors.append({"field": name, "message": "must not contain the NUL character"})
        elif name == "reason":
            reason_values.append(value)
        elif name in values:
            errors.append({"field": name, "message": "is given more than once"})
        else:
            values[name] = value
    reasons: tuple[str, ...] = ()
    try:
        reasons = parse_reasons(reason_values)
    except ValueError as exc:
        errors.append({"field": "reason", "message": str(exc)})
    times: dict[str, datetime | None] = {"from": None, "to": None}
    for name in times:
        if values.get(name):
            try:
                times[name] = parse_timestamp(values[name])
            except ValueError as exc:
                errors.append({"field": name, "message": str(exc)})
    start, end = times["from"], times["to"]
    if start is not None and end is not None and start >= end:
        errors.append({"field": "from", "message": "must be before `to` (the range is [from, to))"})
    status: str | None = values.get("status") or "quarantined"
    if status == "all":
        status = None
    elif status not in STATUSES:
        errors.append({"field": "status", "message": f"must be one of {', '.join(STATUSES)} or all"})
    numbers = {"limit": DEFAULT_LIMIT, "offset": 0}
    for name in numbers:
        raw = values.get(name)
        if raw:
            if not raw.isdigit():
                errors.append({"field": name, "message": "must be a non-negative integer"})
            else:
                numbers[name] = int(raw)
    if not 1 <= numbers["limit"] <= MAX_LIMIT:
        errors.append({"field": "limit", "message": f"must be 1 to {MAX_LIMIT}"})
    if errors:
        raise QuarantineQueryError(errors)
    filters = QuarantineFilter(
        reasons=reasons,
        event_type=values.get("event_type") or None,
        customer_id=values.get("customer_id") or None,
        start=start,
        end=end,
        status=status,
    )
    return filters, numbers["limit"], numbers["offset"]


def list_sql(filters: QuarantineFilter, limit: int, offset: int, bind: Bind) -> tuple[str, dict[str, Any]]:
    """The page of quarantined events, newest first (one row more than ``limit``: is there a next page)."""
    params: dict[str, Any] = {"q_limit": limit + 1, "q_offset": offset}
    sql = (
        "SELECT quarantine_id, event_id, event_type, customer_id, ts, received_at, quarantined_at, reasons,"
        " payload, payload_text, status, stream_seq, replay_id, resolved_at FROM quarantined_events"
        f" WHERE {filters.where(params, bind)}"
        f" ORDER BY quarantined_at DESC, quarantine_id DESC LIMIT {bind('q_limit')} OFFSET {bind('q_offset')}"
    )
    return sql, params


def _time(value: datetime | None) -> str | None:
    return format_timestamp(value) if value is not None else None


def row_json(row: Any) -> dict[str, Any]:
    """One quarantined event as ``GET /v1/quarantine`` shows it."""
    payload = row.payload
    timestamp = _time(row.ts)
    if timestamp is None and isinstance(payload, dict) and isinstance(payload.get("timestamp"), str):
        timestamp = payload["timestamp"]
    return {
        "quarantine_id": row.quarantine_id,
        "id": row.event_id,
        "event_type": row.event_type,
        "customer_id": row.customer_id,
        "timestamp": timestamp,
        "received_at": _time(row.received_at),
        "quarantined_at": _time(row.quarantined_at),
        "reasons": row.reasons,
        "payload": payload,
        "payload_text": row.payload_text,
        "status": row.status,
        "stream_seq": row.stream_seq,
        "replay_id": row.replay_id,
        "resolved_at": _time(row.resolved_at),
    }


def list_answer(rows: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """The JSON answer of ``GET /v1/quarantine`` for the rows of :func:`list_sql`."""
    answer: dict[str, Any] = {"data": [row_json(r) for r in rows[:limit]]}
    if len(rows) > limit:
        answer["next_offset"] = offset + limit
    return answer


def reason_text(reason: dict[str, Any]) -> str:
    """A stored reason as one readable phrase: ``field: message``."""
    field_name, message = reason.get("field") or "", reason.get("message") or reason.get("reason") or ""
    return f"{field_name}: {message}" if field_name else str(message)
