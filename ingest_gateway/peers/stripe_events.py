"""Stripe meter events as platform events, and Stripe's error shape.

Stripe's SDKs read only Stripe's own answers: a success is the meter event object it describes, an
error is ``{"error": {"type", "message", "param", "code"}}`` whose HTTP status picks the exception
(400 ``InvalidRequestError``, 401 ``AuthenticationError``, 403 ``PermissionError``, 429
``RateLimitError``, 5xx ``APIError``). Everything here is pure: the routes are in
:mod:`ingest_gateway.peers.stripe`.

A meter event maps onto the envelope as: ``event_name`` → ``event_type``,
``payload.stripe_customer_id`` → ``customer_id``, ``payload.value`` → the number property ``value``
(kept exact: an integer stays an integer, a decimal is refused rather than rounded when a binary
float cannot carry it), every other payload key → a string property, ``identifier`` → the id
``stripe:<identifier>`` (so the same identifier, by whichever Stripe API it comes, is counted once).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.responses import Response

from ingest_gateway.http import ApiError, json_response
from ingest_gateway.peers.common import scoped_id
from meter_platform.capture.envelope import (
    Event,
    ItemError,
    convert_event,
    format_timestamp,
    new_event_id,
)

PEER = "stripe"
CUSTOMER_KEY = "stripe_customer_id"
VALUE_KEY = "value"
#: A meter value as Stripe's SDKs send it: a plain decimal number, optionally with an exponent.
_NUMBER_RE = re.compile(r"^-?\d{1,40}(\.\d{1,40})?([eE][+-]?\d{1,4})?$")
#: Integers beyond this are refused: JSON readers along the way hold a number as a 64-bit integer.
_MAX_INT = 2**63 - 1
#: Where each envelope field came from, for the ``param`` of an error (see :meth:`Params.of`).
_FIELD_PARAM = {
    "event_type": "event_name",
    "customer_id": f"payload.{CUSTOMER_KEY}",
    "id": "identifier",
    "timestamp": "timestamp",
    "properties": "payload",
}


class StripeError(Exception):
    """An answer in Stripe's error shape (the SDK maps the status to its exception class)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        """``{"error": {"type", "message", "param"?, "code"?}}``."""
        error: dict[str, Any] = {
            "type": "api_error" if self.status >= 500 else "invalid_request_error",
            "message": self.message,
        }
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}

    def response(self) -> Response:
        """The JSON answer."""
        return json_response(self.body(), status=self.status, headers=self.headers)


def from_api_error(exc: ApiError) -> StripeError:
    """One of the gateway's own errors (413, 415, 401/403/429 from the key checks, 503 when JetStream
    does not confirm) in Stripe's shape, with its headers (``Retry-After``, ``WWW-Authenticate``)."""
    code = {429: "rate_limit", 413: "request_too_large", 401: "api_key_invalid"}.get(exc.status)
    return StripeError(exc.status, exc.error, None, code, exc.headers)


def error_body(exc: ApiError) -> dict[str, Any]:
    """The body of :func:`from_api_error`: what the key checks answer under ``/stripe/``."""
    return from_api_error(exc).body()


@dataclass(frozen=True)
class Params:
    """How one API names an event's fields in ``param``: v1 form keys or v2 JSON paths, with the
    prefix of the event in a stream request (``events[3].``)."""

    v1: bool
    prefix: str = ""

    def of(self, field: str, key: str | None = None) -> str:
        """The name of ``field`` (an envelope field, or ``payload`` with ``key``) in this API."""
        name = _FIELD_PARAM.get(field, field)
        if key is not None:
            name = f"payload.{key}"
        if self.v1 and name.startswith("payload."):
            name = f"payload[{name.removeprefix('payload.')}]"
        return self.prefix + name


@dataclass
class Problem:
    """One bad field of one event of a request."""

    param: str
    message: str
    code: str = "parameter_invalid"


def exact_number(raw: Any) -> int | float:
    """A meter value as an exact JSON number: an int when integral (within 64 bits), else a float
    whose shortest form is the very decimal sent. Raises ValueError with the reason otherwise."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError("must be a number, e.g. 25 or 0.5")
    # JSON numbers (v2) take the same path as strings: one rule whichever way the value came.
    text = raw.strip() if isinstance(raw, str) else repr(raw)
    if not _NUMBER_RE.match(text):
        raise ValueError("must be a finite number written in decimal digits, e.g. 25 or 0.5")
    try:
        exact = Decimal(text)
        if exact == exact.to_integral_value() and abs(exact) <= _MAX_INT:
            return int(exact)
        number = float(exact)
        kept = math.isfinite(number) and Decimal(repr(number)) == exact
    except ArithmeticError as exc:  # decimal.InvalidOperation and the like
        raise ValueError("must be a finite number written in decimal digits, e.g. 25 or 0.5") from exc
    if not kept:
        raise ValueError("cannot be kept exactly as a number (send at most 15 significant digits)")
    return number


def unix_timestamp(raw: str) -> str:
    """A v1 ``timestamp`` (integer seconds since the epoch) as the envelope's RFC 3339 timestamp."""
    if not re.fullmatch(r"-?\d{1,12}", raw.strip()):
        raise ValueError("must be an integer number of seconds since the Unix epoch")
    try:
        return format_timestamp(datetime.fromtimestamp(int(raw), UTC))
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError("is outside the years 0001-9999") from exc


def seconds(timestamp: str) -> int:
    """An envelope timestamp (normalized by ``check_times``) as whole seconds since the epoch."""
    return math.floor(datetime.fromisoformat(timestamp).timestamp())


def default_identifier(idempotency_key: str | None, index: int | None) -> str:
    """The identifier of an event sent without one.

    Stripe's SDKs send an ``Idempotency-Key`` on every POST and keep it across their own retries, so
    an identifier derived from it makes a retried request (after a timeout or a 503) count once.
    Without the header it is a fresh UUIDv7, as Stripe would make a fresh identifier.
    """
    if idempotency_key and "\x00" not in idempotency_key:
        suffix = "" if index is None else f":{index}"
        return f"idempotency:{idempotency_key.strip()}{suffix}"
    return new_event_id()


def to_event(
    event_name: Any, payload: Any, identifier: str, timestamp: str | None, where: Params
) -> tuple[Event | None, list[Problem]]:
    """A Stripe meter event as a platform event, or the problems that keep it from being one.

    The event goes through the envelope's own checks (lengths, NUL characters), so it is held to
    the same rules as ``POST /v1/events``; times are checked when it is accepted.
    """
    problems: list[Problem] = []
    if event_name is None or event_name == "":
        problems.append(Problem(where.of("event_type"), "is required", "parameter_missing"))
    if payload is None:
        problems.append(
            Problem(where.of("properties"), f"is required (with {CUSTOMER_KEY})", "parameter_missing")
        )
        return None, problems
    if not isinstance(payload, dict):
        problems.append(Problem(where.of("properties"), "must be an object of string values"))
        return None, problems
    properties: dict[str, Any] = {}
    for key, raw in payload.items():
        if key == CUSTOMER_KEY:
            continue
        if key == VALUE_KEY:
            try:
                properties[key] = exact_number(raw)
            except ValueError as exc:
                problems.append(Problem(where.of("payload", key), str(exc)))
        elif isinstance(raw, str):
            properties[key] = raw
        else:
            problems.append(Problem(where.of("payload", key), "must be a string"))
    customer = payload.get(CUSTOMER_KEY)
    if customer is None or customer == "":
        problems.append(Problem(where.of("customer_id"), "is required", "parameter_missing"))
    if "\x00" in identifier:
        problems.append(Problem(where.of("id"), "must not contain the NUL character"))
    if problems:
        return None, problems
    item: dict[str, Any] = {
        "event_type": event_name,
        "customer_id": customer,
        "id": scoped_id(PEER, identifier),
        "properties": properties,
    }
    if timestamp is not None:
        item["timestamp"] = timestamp
    event, error = convert_event(item)
    if error is not None:
        problems.append(Problem(where.of(error.field or "properties"), error.message))
    return event, problems


#: The fields of one meter event (v1 form parameters, v2 JSON members).
FIELDS = frozenset({"event_name", "payload", "identifier", "timestamp"})


def read_event(
    raw: dict[str, Any], where: Params, idempotency_key: str | None, index: int | None
) -> tuple[Event | None, list[Problem], str]:
    """One meter event of a request (``raw``: its fields, v1 ``timestamp`` still in Unix seconds) as
    ``(event or None, problems, identifier)``; the identifier is made when none was sent."""
    problems = [
        Problem(where.prefix + key, "is not a parameter of a meter event", "parameter_unknown")
        for key in sorted(set(raw) - FIELDS)
    ]
    identifier = raw.get("identifier")
    if identifier is None:
        identifier = default_identifier(idempotency_key, index)
    elif not isinstance(identifier, str) or not identifier:
        problems.append(Problem(where.of("id"), "must be a non-empty string"))
        identifier = ""
    timestamp = raw.get("timestamp")
    if timestamp is not None and where.v1:
        try:
            timestamp = unix_timestamp(str(timestamp))
        except ValueError as exc:
            problems.append(Problem(where.of("timestamp"), str(exc)))
            timestamp = None
    elif timestamp is not None and not isinstance(timestamp, str):
        problems.append(Problem(where.of("timestamp"), "must be an RFC 3339 timestamp string"))
        timestamp = None
    event, more = to_event(raw.get("event_name"), raw.get("payload"), identifier, timestamp, where)
    return event, problems + more, identifier


def echo(payload: dict[str, Any]) -> dict[str, str]:
    """The payload as Stripe shows it back: every value a string."""
    return {str(k): v if isinstance(v, str) else repr(v) for k, v in payload.items()}


def time_problems(errors: list[ItemError], where: list[Params]) -> list[Problem]:
    """The problems ``accept`` found (times), named as the request named them."""
    return [Problem(where[e.index].of(e.field or "timestamp"), e.message) for e in errors]


def refuse(problems: list[Problem], count: int) -> StripeError:
    """A 400 naming every problem (nothing of the request is kept); ``param`` is the first one."""
    first = problems[0]
    listed = "; ".join(f"{p.param} {p.message}" for p in problems[:10])
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    what = "The meter event is" if count == 1 else f"Meter events of this request ({count} in all) are"
    return StripeError(
        400,
        f"{what} not valid: {listed}{more}. Nothing of this request was kept.",
        first.param,
        first.code,
    )
