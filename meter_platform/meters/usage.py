"""Usage queries: a meter's value over a half-open range ``[from, to)``, by window, zone and dimension.

Whole minutes inside the range come from the aggregates, each from the coarsest level that fits: a
UTC day of ``usage_day_aggregates`` or hour of ``usage_hour_aggregates`` when it lies inside the
range and inside one answer window, else ``usage_minute_aggregates`` (``meter_platform.meters.rollups``);
the partial minutes at either edge of a range that is not minute-aligned come from the raw events, so
every answer is exact.
Window boundaries are computed by PostgreSQL in the requested IANA zone (DST-correct: a
Europe/Berlin day lasts 23, 24 or 25 hours).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meter_platform.capture.envelope import format_timestamp, parse_timestamp
from meter_platform.catalog import Meter
from meter_platform.meters.aggregates import Bind, event_expressions, sqlalchemy_bind
from meter_platform.meters.rollups import level_ctes_sql, level_rows_sql

WINDOWS = ("minute", "hour", "day", "month")
#: A numeric aggregation's value over rows of any level (minutes, hours, days, edge events as rows).
AGGREGATE_VALUES = {
    "count": "sum(event_count)",
    "sum": "sum(value_sum)",
    "min": "min(value_min)",
    "max": "max(value_max)",
    "avg": "sum(value_sum) / nullif(sum(value_count), 0)",
}
MAX_ROWS = 10_000


class UsageQueryError(ValueError):
    """The query cannot be answered as asked; the message says why (a 400)."""


@dataclass(frozen=True)
class UsageQuery:
    """A checked usage query."""

    meter: Meter
    start: datetime | None
    end: datetime
    window: str | None = None
    tz: str = "UTC"
    group_by: tuple[str, ...] = ()
    customer_id: str | None = None
    limit: int = MAX_ROWS
    offset: int = 0
    #: (dimension, the values it may have): only rows whose dimension has one of them are counted.
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _parse_time(value: str, name: str) -> datetime:
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise UsageQueryError(f"`{name}` {exc}") from exc


def build_query(
    meter: Meter,
    params: Mapping[str, str],
    now: datetime | None = None,
    filters: Mapping[str, Sequence[str]] | None = None,
) -> UsageQuery:
    """Check a usage request's parameters (strings, as from a URL) against the meter.

    ``filters``: dimension -> the values it may have (``filter[<dimension>]=<value>``, repeated for
    several); any of the meter's dimensions, ``customer_id`` included."""
    window = params.get("window") or None
    if window is not None and window not in WINDOWS:
        raise UsageQueryError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
    tz = params.get("tz") or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a name too long for a path
        raise UsageQueryError(f"tz {tz!r} is not an IANA time zone (e.g. Europe/Berlin)") from exc
    if "\x00" in (params.get("customer_id") or ""):
        raise UsageQueryError("customer_id must not contain the NUL character")
    end = _parse_time(params["to"], "to") if params.get("to") else (now or datetime.now(UTC))
    start = _parse_time(params["from"], "from") if params.get("from") else None
    if start is not None and start >= end:
        raise UsageQueryError("`from` must be before `to` (the range is [from, to))")
    group_by = tuple(g.strip() for g in (params.get("group_by") or "").split(",") if g.strip())
    unknown = [g for g in group_by if g not in meter.dimensions]
    if unknown:
        raise UsageQueryError(
            f"meter {meter.slug!r} has no dimension {', '.join(map(repr, unknown))}; "
            f"it has {', '.join(meter.dimensions)}"
        )
    checked_filters = _check_filters(meter, filters or {})
    try:
        limit = int(params.get("limit") or MAX_ROWS)
        offset = int(params.get("offset") or 0)
    except ValueError as exc:
        raise UsageQueryError("limit and offset must be integers") from exc
    if not 1 <= limit <= MAX_ROWS or offset < 0:
        raise UsageQueryError(f"limit must be 1 to {MAX_ROWS} and offset >= 0")
    return UsageQuery(
        meter,
        start,
        end,
        window,
        tz,
        group_by,
        params.get("customer_id") or None,
        limit,
        offset,
        checked_filters,
    )


def _check_filters(
    meter: Meter, filters: Mapping[str, Sequence[str]]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    unknown = [d for d in filters if d not in meter.dimensions]
    if unknown:
        raise UsageQueryError(
            f"meter {meter.slug!r} has no dimension {', '.join(map(repr, unknown))} to filter on; "
            f"it has {', '.join(meter.dimensions)}"
        )
    checked = []
    for dim, values in filters.items():
        if not values or any("\x00" in v for v in values):
            raise UsageQueryError(f"filter[{dim}] needs a value (without the NUL character)")
        checked.append((dim, tuple(dict.fromkeys(values))))
    return tuple(checked)


def usage_sql(
    q: UsageQuery, bind: Bind = sqlalchemy_bind, events: str = "usage_events"
) -> tuple[str, dict[str, Any]]:
    """The SQL answering the query (placeholders in ``bind``'s style), and its parameters.

    ``events`` is where raw events are read (the edge minutes, and unique_count and latest meters):
    ``usage_events``, or a relation that adds archived rows to it (``meter_platform.archive.reader``
    runs the query that way when the range reaches archived days).
    """
    meter = q.meter
    params: dict[str, Any] = {"slug": meter.slug, "tz": q.tz, "end": q.end, "customer": q.customer_id}
    dims_sql, value_sql, where = event_expressions(meter, params, bind)
    tz, end, slug = bind("tz"), f"CAST({bind('end')} AS timestamptz)", bind("slug")
    customer_filter = f"AND customer_id = {bind('customer')}" if q.customer_id else ""
    if q.start is None:
        start_sql = (
            f"(SELECT coalesce(min(minute), {end}) FROM usage_minute_aggregates WHERE meter_slug = {slug})"
        )
    else:
        start_sql = f"CAST({bind('start')} AS timestamptz)"
        params["start"] = q.start
    bucket, bucket_end = _bucket_sql(q.window, tz)
    group_cols = ["customer_id" if ("customer_id" in q.group_by or q.customer_id) else "CAST(NULL AS text)"]
    dim_names = [g for g in q.group_by if g != "customer_id"]
    for i, dim in enumerate(dim_names):
        params[f"gk{i}"] = dim
        group_cols.append(f"dims ->> CAST({bind(f'gk{i}')} AS text)")
    group_select = ", ".join(f"{c} AS g{i}" for i, c in enumerate(group_cols))
    kept = ["true"]
    for i, (dim, values) in enumerate(q.filters):
        params[f"fv{i}"] = list(values)
        column = "src.customer_id" if dim == "customer_id" else f"src.dims ->> CAST({bind(f'fk{i}')} AS text)"
        if dim != "customer_id":
            params[f"fk{i}"] = dim
        kept.append(f"{column} = ANY(CAST({bind(f'fv{i}')} AS text[]))")
    group_refs = ", ".join(f"g{i}" for i in range(len(group_cols)))

    # The raw ranges again with plain parameters (each a superset of its range), so the planner prunes
    # the day partitions of usage_events as it plans: values from the bounds CTE prune only at run time,
    # after every partition was planned (20-30 ms for 40 days).
    low, low_edge = "", ""
    if q.start is not None:
        params["edge_start"] = q.start + timedelta(minutes=1)
        low = f" AND ts >= CAST({bind('start')} AS timestamptz)"
        low_edge = f"{low} AND ts < CAST({bind('edge_start')} AS timestamptz)"
    params["edge_end"] = q.end - timedelta(minutes=1)
    high_edge = f" AND ts >= CAST({bind('edge_end')} AS timestamptz) AND ts < {end}"
    prune = (f"{low} AND ts < {end}", low_edge, high_edge)
    source, value = _source_sql(meter, dims_sql, value_sql, where, customer_filter, slug, events, prune)
    levels = (
        "" if meter.aggregation in ("unique_count", "latest") else level_ctes_sql(q.window, tz, slug) + ","
    )
    sql = f"""
        WITH bounds AS (
            SELECT s AS range_start, e AS range_end,
                   least(date_trunc('minute', s) + CASE WHEN date_trunc('minute', s) = s THEN interval '0'
                                                     ELSE interval '1 minute' END, e) AS inner_start,
                   greatest(date_trunc('minute', e), s) AS inner_end
            FROM (SELECT {start_sql} AS s, {end} AS e) r
        ),{levels} src AS ({source}
        ), bucketed AS (
            SELECT {bucket} AS bucket_start, {group_select}, src.*
            FROM src, bounds b
            WHERE {" AND ".join(kept)}
        )
        SELECT greatest(bucket_start, b.range_start) AS window_start,
               least({bucket_end}, b.range_end) AS window_end,
               {group_refs}, {value} AS value,
               b.range_start, b.range_end
        FROM bucketed, bounds b
        GROUP BY bucket_start, b.range_start, b.range_end, {group_refs}
        ORDER BY window_start, {group_refs}
        LIMIT {bind("limit")} OFFSET {bind("offset")}
    """
    params["limit"] = q.limit + 1
    params["offset"] = q.offset
    return sql, params


def _bucket_sql(window: str | None, tz: str) -> tuple[str, str]:
    """SQL for a row's window start (over ``t``) and a window's end (over ``bucket_start``)."""
    if window is None:
        bucket, bucket_end = "b.range_start", "b.range_end"
    elif window in ("minute", "hour"):
        bucket = f"date_trunc('{window}', t, {tz})"
        bucket_end = f"bucket_start + interval '1 {window}'"
    else:  # local calendar arithmetic: a day or month in the zone, whatever its length
        bucket = f"date_trunc('{window}', t, {tz})"
        bucket_end = f"(bucket_start AT TIME ZONE {tz} + interval '1 {window}') AT TIME ZONE {tz}"
    return bucket, bucket_end


def _source_sql(
    meter: Meter,
    dims_sql: str,
    value_sql: str,
    where: str,
    customer_filter: str,
    slug: str,
    events: str,
    prune: tuple[str, str, str] = ("", "", ""),
) -> tuple[str, str]:
    """The ``src`` subquery of the meter's rows within ``bounds``, and the aggregate of its value.
    ``prune``: extra conditions on ts for the whole range, the low edge and the high edge."""
    if meter.aggregation in ("unique_count", "latest"):
        # Exact over any range: straight from the raw events (distinct values do not compose).
        source = f"""
            SELECT ts AS t, ts, id, customer_id, {dims_sql} AS dims, {value_sql} AS v
            FROM {events}, bounds b
            WHERE {where} {customer_filter} AND ts >= b.range_start AND ts < b.range_end{prune[0]}"""
        if meter.aggregation == "unique_count":
            value = "count(DISTINCT v)"
        else:
            value = "(array_agg(v ORDER BY ts DESC, id DESC) FILTER (WHERE v IS NOT NULL))[1]"
    else:
        # Whole minutes from the aggregates (days, hours, minutes), the partial edge minutes from raw events:
        # two tight ranges, [start, inner_start) and [inner_end, end), so the index reads only the edges
        # (the greatest() keeps a range inside one minute, where inner_start > inner_end, counted once).
        source = f"""
            {level_rows_sql(slug, customer_filter)}
            UNION ALL
            SELECT ts, customer_id, dims, 1, CASE WHEN v IS NULL THEN 0 ELSE 1 END, v, v, v
            FROM (SELECT ts, customer_id, {dims_sql} AS dims, {value_sql} AS v FROM {events}, bounds b
                  WHERE {where} {customer_filter} AND ts >= b.range_start AND ts < b.inner_start{prune[1]}
                  UNION ALL
                  SELECT ts, customer_id, {dims_sql} AS dims, {value_sql} AS v FROM {events}, bounds b
                  WHERE {where} {customer_filter}
                    AND ts >= greatest(b.inner_end, b.inner_start) AND ts < b.range_end{prune[2]}) edge"""
        value = AGGREGATE_VALUES[meter.aggregation]
    return source, value


def _number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else value
    return value


def usage_answer(q: UsageQuery, rows: list[Any]) -> dict[str, Any]:
    """The contract's JSON answer for the query's result rows."""
    dim_names = [g for g in q.group_by if g != "customer_id"]
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    data = []
    start = q.start
    for row in rows:
        window_start, window_end, customer, *dims = row[: 3 + len(dim_names)]
        value = row[3 + len(dim_names)]
        start = start or row[-2]
        data.append(
            {
                "customer_id": customer,
                "window_start": format_timestamp(window_start),
                "window_end": format_timestamp(window_end),
                "group": dict(zip(dim_names, dims, strict=True)),
                "value": _number(value)
                if value is not None
                else (0 if q.meter.aggregation in ("count", "sum", "unique_count") else None),
            }
        )
    answer: dict[str, Any] = {
        "meter": q.meter.slug,
        "window": q.window,
        "tz": q.tz,
        "from": format_timestamp(start) if start else None,
        "to": format_timestamp(q.end),
        "data": data,
    }
    if more:
        answer["next_offset"] = q.offset + q.limit
    return answer
