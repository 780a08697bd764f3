"""OpenMeter's meters and usage query, under ``/openmeter/api/v1/meters``, answered by the platform's own
usage query (:mod:`meter_platform.meters.usage`), so every value equals ``GET /v1/meters/{slug}/usage``.

How the query's parameters map to ours: ``from``/``to`` are ``[from, to)`` (RFC 3339); ``windowSize``
MINUTE, HOUR, DAY or MONTH is ``window``; ``windowTimeZone`` is ``tz``; ``groupBy`` takes the meter's
dimensions, and ``subject`` (or ``customer_id``) groups by customer; ``subject`` and
``filterCustomerId`` (repeated) both filter on ``customer_id`` (both given: the customers in both), and
each filtered customer gets rows of its own, labelled with it. ``filterGroupBy`` (a dimension ->
a value, or a list of values; in a URL as ``filterGroupBy[<dimension>]=<value>`` or the whole map in
one parameter) is the usage query's ``filter[<dimension>]``;
``advancedMeterGroupByFilters`` is refused with a 400.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway.archived import usage_rows
from ingest_gateway.gateway import Gateway, gateway_of
from ingest_gateway.http import ApiError, bracketed, json_response, read_json_object
from ingest_gateway.peers.openmeter_problems import problems, with_problems
from meter_platform.capture.envelope import format_timestamp
from meter_platform.catalog import Meter
from meter_platform.meters.usage import UsageQueryError, build_query, usage_answer

WINDOW_SIZES = ("MINUTE", "HOUR", "DAY", "MONTH")
#: groupBy values that mean "by customer" (OpenMeter reserves ``subject``).
BY_CUSTOMER = ("subject", "customer_id")
_UNSUPPORTED = ("advancedMeterGroupByFilters",)
_FILTER = "filterGroupBy"
#: The longest filterGroupBy map read as a Python literal (a few dimensions and values).
_MAX_LITERAL = 4096
_EPOCH = "1970-01-01T00:00:00.000000Z"


@dataclass
class MeterQuery:
    """An OpenMeter usage query, from a URL or a JSON body."""

    start: str | None = None
    end: str | None = None
    window_size: str | None = None
    tz: str | None = None
    subjects: list[str] | None = None
    customers: list[str] | None = None
    group_by: list[str] = field(default_factory=list)
    filters: dict[str, list[str]] = field(default_factory=dict)


def _strings(values: Any, name: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ApiError(400, f"`{name}` must be a list of strings.")
    return [v for v in values if v]


def from_url(request: Request) -> MeterQuery:
    """The query of ``GET .../query`` (repeated ``subject``, ``filterCustomerId``, ``groupBy``)."""
    params = request.query_params
    unsupported = sorted({k.split("[")[0] for k in params if k.split("[")[0] in _UNSUPPORTED})
    if unsupported:
        raise ApiError(
            400, f"{', '.join(unsupported)} is not supported here; use groupBy and filter the rows."
        )
    subjects = [v for v in params.getlist("subject") if v]
    customers = [v for v in params.getlist("filterCustomerId") if v]
    return MeterQuery(
        start=params.get("from") or None,
        end=params.get("to") or None,
        window_size=params.get("windowSize") or None,
        tz=params.get("windowTimeZone") or None,
        subjects=subjects or None,
        customers=customers or None,
        group_by=[v for v in params.getlist("groupBy") if v],
        filters=_url_filters(params.multi_items()),
    )


def _url_filters(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``filterGroupBy[<dimension>]=<value>`` (repeated: any of the values), or the whole map in one
    ``filterGroupBy``: a JSON object, or the Python dict literal the official SDK's ``query_json`` sends."""
    filters, bare = bracketed(items, _FILTER)
    for text in bare:
        for dim, values in _body_filters(_map_literal(text)).items():
            filters.setdefault(dim, []).extend(values)
    return filters


def _map_literal(text: str) -> Any:
    """A map written as JSON or as a Python literal of strings; anything else is a 400."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if len(text) <= _MAX_LITERAL:
        try:
            return ast.literal_eval(text)  # literals only: never runs code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    raise ApiError(400, f"{_FILTER} takes {_FILTER}[<dimension>]=<value>, or the map as a JSON object.")


def _body_filters(value: Any) -> dict[str, list[str]]:
    """``"filterGroupBy": {"<dimension>": "<value>" or ["<value>", ...]}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"`{_FILTER}` must be an object of dimension -> value(s).")
    filters: dict[str, list[str]] = {}
    for dim, values in value.items():
        listed = values if isinstance(values, list) else [values]
        if not listed or not all(isinstance(v, str) for v in listed):
            raise ApiError(400, f"`{_FILTER}.{dim}` must be a string or a list of strings.")
        filters[dim] = listed
    return filters


def from_body(body: dict[str, Any]) -> MeterQuery:
    """The query of ``POST .../query`` (a MeterQueryRequest JSON object)."""
    unsupported = [k for k in _UNSUPPORTED if body.get(k)]
    if unsupported:
        raise ApiError(
            400, f"{', '.join(unsupported)} is not supported here; use groupBy and filter the rows."
        )
    text: dict[str, str | None] = {}
    for name in ("from", "to", "windowSize", "windowTimeZone"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"`{name}` must be a string.")
        text[name] = value or None
    lists = {n: _strings(body[n], n) if body.get(n) is not None else None
             for n in ("subject", "filterCustomerId", "groupBy")}  # fmt: skip
    return MeterQuery(text["from"], text["to"], text["windowSize"], text["windowTimeZone"],
                      lists["subject"] or None, lists["filterCustomerId"] or None, lists["groupBy"] or [],
                      _body_filters(body.get(_FILTER)))  # fmt: skip


def _meter(gw: Gateway, slug: str) -> Meter:
    meter = gw.catalog.meter(slug)
    if meter is None:
        raise ApiError(404, f"There is no meter {slug!r}; GET /openmeter/api/v1/meters lists them.")
    return meter


def _plan(meter: Meter, mq: MeterQuery) -> tuple[dict[str, str], list[str] | None]:
    """Our usage parameters for the query, and the customers to query one by one (None: all)."""
    window = None
    if mq.window_size is not None:
        if mq.window_size.upper() not in WINDOW_SIZES:
            raise ApiError(
                400, f"windowSize must be one of {', '.join(WINDOW_SIZES)}, not {mq.window_size!r}."
            )
        window = mq.window_size.lower()
    if mq.tz is not None and len(mq.tz) > 64:  # IANA names are short; a long one is no file name at all
        raise ApiError(400, "windowTimeZone must be an IANA time zone, e.g. Europe/Berlin.")
    unknown = [g for g in mq.group_by if g not in BY_CUSTOMER and g not in meter.group_by]
    if unknown:
        raise ApiError(400, f"Meter {meter.slug!r} has no dimension {', '.join(map(repr, unknown))}; "
                            f"groupBy takes subject and {', '.join(meter.group_by) or 'nothing else'}.")  # fmt: skip
    by_customer = ["customer_id"] if any(g in BY_CUSTOMER for g in mq.group_by) else []
    dims = list(dict.fromkeys(g for g in mq.group_by if g not in BY_CUSTOMER))
    params = {"from": mq.start or "", "to": mq.end or "", "window": window or "", "tz": mq.tz or "",
              "group_by": ",".join(by_customer + dims)}  # fmt: skip
    customers = None
    if mq.subjects is not None or mq.customers is not None:
        wanted = [set(c) for c in (mq.subjects, mq.customers) if c is not None]
        customers = sorted(set.intersection(*wanted))
    return params, customers


async def run_query(gw: Gateway, meter: Meter, mq: MeterQuery) -> dict[str, Any]:
    """OpenMeter's ``MeterQueryResult`` for the query, computed by the platform's usage query."""
    params, customers = _plan(meter, mq)
    now = datetime.now(UTC)
    try:  # checked once up front, also when no customer is left to query
        q = build_query(meter, params, now=now, filters=mq.filters)
        queries = [q] if customers is None else [build_query(meter, {**params, "customer_id": c}, now=now,
                                                             filters=mq.filters) for c in customers]  # fmt: skip
    except UsageQueryError as exc:
        raise ApiError(400, str(exc)) from exc
    rows: list[dict[str, Any]] = []
    start, end = (format_timestamp(q.start) if q.start else None), format_timestamp(q.end)
    for q in queries:
        answer = usage_answer(q, await usage_rows(gw, q))
        if "next_offset" in answer:
            raise ApiError(400, "The answer has more than 10,000 rows; narrow the range or widen windowSize.")
        start = answer["from"]
        rows += [_row(r) for r in answer["data"]]
    if customers is not None and len(customers) > 1:
        rows.sort(key=lambda r: r["windowStart"])  # stable: customers stay in order within a window
    window = mq.window_size.upper() if mq.window_size else None
    return {"from": start, "to": end, "windowSize": window, "data": rows}


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "value": row["value"],
        "windowStart": row["window_start"],
        "windowEnd": row["window_end"],
        "subject": row["customer_id"],
        "customerId": row["customer_id"],
        "groupBy": row["group"],
    }


async def query_get(request: Request) -> Response:
    """GET /openmeter/api/v1/meters/{slug}/query."""
    gw = gateway_of(request)
    meter = _meter(gw, request.path_params["slug"])
    return json_response(await run_query(gw, meter, from_url(request)))


async def query_post(request: Request) -> Response:
    """POST /openmeter/api/v1/meters/{slug}/query (the SDK's ``meters.query``)."""
    gw = gateway_of(request)
    meter = _meter(gw, request.path_params["slug"])
    return json_response(await run_query(gw, meter, from_body(await read_json_object(request))))


async def _activated(gw: Gateway) -> dict[str, str]:
    rows = await gw.query("SELECT slug, activated_at FROM meter_definitions")
    return {r.slug: r.activated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for r in rows}


def meter_json(meter: Meter, created: str | None) -> dict[str, Any]:
    """A catalog meter as OpenMeter shows a meter (paths as JSONPath, aggregation upper case)."""
    return {
        "id": meter.slug,
        "slug": meter.slug,
        "name": meter.slug,
        "aggregation": meter.aggregation.upper(),
        "eventType": meter.event_type,
        "valueProperty": f"$.{meter.value_property}" if meter.value_property else None,
        "groupBy": {d: f"$.{d}" for d in meter.group_by},
        "createdAt": created or _EPOCH,
        "updatedAt": created or _EPOCH,
    }


async def list_meters(request: Request) -> Response:
    """GET /openmeter/api/v1/meters: the catalog's meters."""
    gw = gateway_of(request)
    created = await _activated(gw)
    return json_response([meter_json(m, created.get(m.slug)) for m in gw.catalog.meters])


async def get_meter(request: Request) -> Response:
    """GET /openmeter/api/v1/meters/{slug}."""
    gw = gateway_of(request)
    meter = _meter(gw, request.path_params["slug"])
    return json_response(meter_json(meter, (await _activated(gw)).get(meter.slug)))


ROUTES: list[Route] = [
    Route("/openmeter/api/v1/meters", with_problems(list_meters), methods=["GET"]),
    Route("/openmeter/api/v1/meters/{slug}", with_problems(get_meter), methods=["GET"]),
    Route("/openmeter/api/v1/meters/{slug}/query", with_problems(query_get), methods=["GET"]),
    Route("/openmeter/api/v1/meters/{slug}/query", with_problems(query_post), methods=["POST"]),
]

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_METER = {
    "type": "object",
    "required": ["id", "slug", "aggregation", "eventType", "groupBy", "createdAt", "updatedAt"],
    "properties": {"id": _STR, "slug": _STR, "name": _STR, "aggregation": _STR, "eventType": _STR,
                   "valueProperty": _NSTR, "groupBy": {"type": "object"}, "createdAt": _STR, "updatedAt": _STR},
}  # fmt: skip
_RESULT = {
    "type": "object",
    "required": ["from", "to", "windowSize", "data"],
    "properties": {
        "from": _NSTR,
        "to": _STR,
        "windowSize": {"enum": [*WINDOW_SIZES, None]},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["value", "windowStart", "windowEnd", "subject", "groupBy"],
                "properties": {"value": {"type": ["number", "null"]}, "windowStart": _STR, "windowEnd": _STR,
                               "subject": _NSTR, "customerId": _NSTR, "groupBy": {"type": "object"}},
            },
        },
    },
}  # fmt: skip
_SLUG = {"name": "slug", "in": "path", "required": True, "schema": _STR, "description": "The meter."}


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema or _STR}


def _many(name: str, description: str) -> dict[str, Any]:
    return {**_q(name, description, {"type": "array", "items": _STR}), "style": "form", "explode": True}


_QUERY_PARAMS = [
    _q("from", "Start of the range (RFC 3339), included."),
    _q("to", "End of the range (RFC 3339), excluded; default now."),
    _q("windowSize", "MINUTE, HOUR, DAY or MONTH; none: one row per group.", {"enum": list(WINDOW_SIZES)}),
    _q("windowTimeZone", "IANA time zone of the windows (default UTC)."),
    _many("subject", "Only these customers (each with rows of its own)."),
    _many("filterCustomerId", "Only these customers (as subject)."),
    _many("groupBy", "subject and/or the meter's dimensions."),
]
_QUERY_ERRORS = problems(400, 401, 403, 404, 429, 503, described={404: "No such meter."})
_OK_RESULT = {"200": {"description": "The usage.", "content": {"application/json": {"schema": _RESULT}}}}

#: This module's entries of /openapi.json.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/openmeter/api/v1/meters": {
        "get": {
            "summary": "OpenMeter: the catalog's meters.",
            "tags": ["openmeter"],
            "responses": {
                "200": {
                    "description": "The meters.",
                    "content": {"application/json": {"schema": {"type": "array", "items": _METER}}},
                },
                **problems(401, 403, 429, 503),
            },
        }
    },
    "/openmeter/api/v1/meters/{slug}": {
        "get": {
            "summary": "OpenMeter: one meter.",
            "tags": ["openmeter"],
            "parameters": [_SLUG],
            "responses": {
                "200": {"description": "The meter.", "content": {"application/json": {"schema": _METER}}},
                **problems(401, 403, 404, 429, 503, described={404: "No such meter."}),
            },
        }
    },
    "/openmeter/api/v1/meters/{slug}/query": {
        "get": {
            "summary": "OpenMeter: a meter's usage, computed as GET /v1/meters/{slug}/usage.",
            "tags": ["openmeter"],
            "parameters": [_SLUG, *_QUERY_PARAMS],
            "responses": {**_OK_RESULT, **_QUERY_ERRORS},
        },
        "post": {
            "summary": "OpenMeter: the same query, its parameters in a JSON body.",
            "tags": ["openmeter"],
            "parameters": [_SLUG],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": {**_OK_RESULT, **_QUERY_ERRORS, **problems(413, 415)},
        },
    },
}
