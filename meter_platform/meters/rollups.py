"""Hourly and daily rollups of the per-minute aggregates: how they are written, read and checked.

``usage_hour_aggregates`` and ``usage_day_aggregates`` (migration 0009) hold, per UTC hour and UTC day,
exactly the sums of their minutes. They are written by the same statement that upserts the minutes
(:func:`upsert_all_levels_sql`), from the same rows, so the ingestion writer (newly stored rows only),
quarantine replays and meter rebuilds keep all three levels equal in one transaction.

Each batch rewrites the rows of the open minute, hour and day, so most of the statement's cost is the
conflict check (an index descent per row and level) and the update. Migration 0012 leaves room on the
three tables' pages so these updates stay on their page (HOT: no new index entries for the next check
to walk past). One statement per event type instead of per meter, grouping by the dims' text instead
of the jsonb, and UPDATE-then-INSERT instead of ``ON CONFLICT`` were measured too: none was cheaper.

A usage query reads the coarsest rows that fit (:func:`level_ctes_sql`): a UTC day only when it lies
inside the range's whole-minute part and inside one answer window, else its UTC hours under the same
rule, else its minutes. Every minute of the range is read from exactly one level.
"""

from __future__ import annotations

from typing import Any

#: Rollup level -> (table, time column, its length as an absolute interval). Always hours, never
#: ``'1 day'``: timestamptz + '1 day' follows the session's zone and would step 23 or 25 hours.
ROLLUPS: dict[str, tuple[str, str, str]] = {
    "hour": ("usage_hour_aggregates", "hour", "interval '1 hour'"),
    "day": ("usage_day_aggregates", "day", "interval '24 hours'"),
}

_COLUMNS = "meter_slug, {time}, customer_id, dims, event_count, value_count, value_sum, value_min, value_max"

# Sums, counts, minima and maxima compose; a sum stays NULL only while no event carried a value.
_MERGE = """
            event_count = a.event_count + EXCLUDED.event_count,
            value_count = a.value_count + EXCLUDED.value_count,
            value_sum = CASE WHEN a.value_sum IS NULL AND EXCLUDED.value_sum IS NULL THEN NULL
                             ELSE coalesce(a.value_sum, 0) + coalesce(EXCLUDED.value_sum, 0) END,
            value_min = least(a.value_min, EXCLUDED.value_min),
            value_max = greatest(a.value_max, EXCLUDED.value_max),
            updated_at = now()"""


def _upsert(table: str, time: str, select: str) -> str:
    # Rows in key order, so concurrent writers lock them in the same order (fewer deadlocks).
    return f"""
        INSERT INTO {table} AS a ({_COLUMNS.format(time=time)})
        {select}
        ORDER BY 2, 3, 4
        ON CONFLICT (meter_slug, {time}, customer_id, dims) DO UPDATE SET {_MERGE}"""


def upsert_all_levels_sql(minutes_select: str, slug_bind: str) -> str:
    """One statement adding ``minutes_select`` (a meter's per-minute aggregates: minute, customer_id,
    dims, event_count, value_count, value_sum, value_min, value_max) to the minute, hour and day tables.

    One statement: the batch's minutes are computed once, and no caller can update one level alone.
    """
    rollups = []
    for level, (table, time, _) in ROLLUPS.items():
        rolled = (
            f"SELECT {slug_bind}, date_trunc('{level}', minute, 'UTC'), customer_id, dims, sum(event_count),"
            " sum(value_count), sum(value_sum), min(value_min), max(value_max) FROM m GROUP BY 2, 3, 4"
        )
        rollups.append(_upsert(table, time, rolled))
    minutes = _upsert("usage_minute_aggregates", "minute", f"SELECT {slug_bind}, * FROM m")
    return f"""
        WITH m AS MATERIALIZED ({minutes_select}
        ), minutes AS ({minutes}
        ), hours AS ({rollups[0]}
        ){rollups[1]}"""


def _fits(window: str | None, start: str, length: str, tz: str) -> str:
    """SQL: the span [start, start + length) lies inside one answer window (always, without windows)."""
    if window is None:
        return "true"
    if window == "minute":
        return "false"
    return (
        f"date_trunc('{window}', {start}, {tz})"
        f" = date_trunc('{window}', {start} + {length} - interval '1 microsecond', {tz})"
    )


def _extent_sql(slug: str, agg: str) -> str:
    """SQL: ``agg`` (min or max) of the meter's row starts over every level: one index probe each."""
    tables = [("usage_minute_aggregates", "minute"), *((t, c) for t, c, _ in ROLLUPS.values())]
    probes = ", ".join(f"(SELECT {agg}({c}) FROM {t} WHERE meter_slug = {slug})" for t, c in tables)
    return f"{'least' if agg == 'min' else 'greatest'}({probes})"


def level_ctes_sql(window: str | None, tz: str, slug: str) -> str:
    """CTEs (after a ``bounds`` CTE with ``inner_start``/``inner_end``, the whole-minute part) naming
    what each level answers: ``days`` (d), ``hours`` (h) and ``minute_spans`` [lo, hi).

    A day is used when it lies in the whole-minute part and in one window; an hour when it does and its
    day is not used; minutes are read for every UTC hour overlapping the part that neither covers.

    The series run only over ``span``: the whole-minute part cut to the UTC days that hold any row of
    the meter (at any level), so a range from the year 99 costs what the data's own days cost, not
    millions of generated hours (no rows: an empty span). Every row lies inside those days, and their
    bounds are day-aligned, so each minute with data is still read from exactly one level.
    """
    day_len, hour_len = ROLLUPS["day"][2], ROLLUPS["hour"][2]
    return f"""
        span AS (
            SELECT s AS lo, greatest(least(b.inner_end, e), s) AS hi
            FROM bounds b, LATERAL (SELECT
                greatest(b.inner_start, coalesce(date_trunc('day', {_extent_sql(slug, "min")}, 'UTC'),
                                                 b.inner_end)) AS s,
                coalesce(date_trunc('day', {_extent_sql(slug, "max")}, 'UTC') + {day_len}, b.inner_start) AS e
            ) x
        ), days AS (
            SELECT d FROM span b, generate_series(
                date_trunc('day', b.lo + {day_len} - interval '1 microsecond', 'UTC'),
                b.hi - {day_len}, {day_len}) d
            WHERE {_fits(window, "d", day_len, tz)}
        ), hours AS (
            SELECT h FROM span b, generate_series(
                date_trunc('hour', b.lo + {hour_len} - interval '1 microsecond', 'UTC'),
                b.hi - {hour_len}, {hour_len}) h
            WHERE {_fits(window, "h", hour_len, tz)}
              AND NOT EXISTS (SELECT 1 FROM days WHERE d = date_trunc('day', h, 'UTC'))
        ), minute_spans AS (
            SELECT greatest(x, b.lo) AS lo, least(x + {hour_len}, b.hi) AS hi
            FROM span b, generate_series(date_trunc('hour', b.lo, 'UTC'), b.hi, {hour_len}) x
            WHERE x < b.hi
              AND NOT EXISTS (SELECT 1 FROM days WHERE d = date_trunc('day', x, 'UTC'))
              AND NOT EXISTS (SELECT 1 FROM hours WHERE h = x)
        )"""


_VALUES = "customer_id, dims, event_count, value_count, value_sum, value_min, value_max"


def level_rows_sql(slug: str, customer_filter: str) -> str:
    """UNION ALL of the day, hour and minute rows the CTEs of :func:`level_ctes_sql` name, as ``t``
    (the row's start) and the value columns.

    The min/max bounds are InitPlans, so each table is read by an index range scan of the range only.
    """
    parts = []
    for level, (table, time, _) in reversed(ROLLUPS.items()):
        cte, col = {"day": ("days", "d"), "hour": ("hours", "h")}[level]
        parts.append(
            f"""SELECT {time} AS t, {_VALUES} FROM {table}
            WHERE meter_slug = {slug} {customer_filter}
              AND {time} >= (SELECT min({col}) FROM {cte}) AND {time} <= (SELECT max({col}) FROM {cte})
              AND {time} IN (SELECT {col} FROM {cte})"""
        )
    # One index range scan per span: OFFSET 0 keeps the lateral subquery from being flattened into a
    # join, which the planner (not knowing the spans' bounds) would answer with a scan of the whole table.
    parts.append(
        f"""SELECT m.* FROM minute_spans s CROSS JOIN LATERAL (
                SELECT minute AS t, {_VALUES} FROM usage_minute_aggregates
                WHERE meter_slug = {slug} {customer_filter}
                  AND minute >= s.lo AND minute < s.hi AND minute + interval '1 minute' <= s.hi
                OFFSET 0) m"""
    )
    return "\n            UNION ALL\n            ".join(parts)


def rollup_mismatches_sql(level: str) -> str:
    """A SELECT of one meter's ``level`` rows in [start, end) (psycopg binds slug, start, end; whole
    rollup periods only) against the sums of their minutes: (period, customer, dims, minutes' count,
    rollup count, minutes' sum, rollup sum, differs) each."""
    table, time, _ = ROLLUPS[level]
    lo = f"date_trunc('{level}', CAST(%(start)s AS timestamptz), 'UTC')"
    hi = f"date_trunc('{level}', CAST(%(end)s AS timestamptz), 'UTC')"
    return f"""
        WITH mins AS (
            SELECT date_trunc('{level}', minute, 'UTC') AS p, customer_id, dims,
                   CAST(sum(event_count) AS bigint) AS event_count,
                   CAST(sum(value_count) AS bigint) AS value_count, sum(value_sum) AS value_sum,
                   min(value_min) AS value_min, max(value_max) AS value_max
            FROM usage_minute_aggregates
            WHERE meter_slug = %(slug)s AND minute >= {lo} AND minute < {hi}
            GROUP BY 1, 2, 3
        ), roll AS (
            SELECT {time} AS p, customer_id, dims, event_count, value_count, value_sum, value_min, value_max
            FROM {table} WHERE meter_slug = %(slug)s AND {time} >= {lo} AND {time} < {hi}
        )
        SELECT coalesce(mins.p, roll.p), coalesce(mins.customer_id, roll.customer_id),
               coalesce(mins.dims, roll.dims), mins.event_count, roll.event_count, mins.value_sum, roll.value_sum,
               (mins.p IS NULL OR roll.p IS NULL
                OR mins.event_count <> roll.event_count OR mins.value_count <> roll.value_count
                OR mins.value_sum IS DISTINCT FROM roll.value_sum OR mins.value_min IS DISTINCT FROM roll.value_min
                OR mins.value_max IS DISTINCT FROM roll.value_max) AS differs
        FROM mins FULL OUTER JOIN roll USING (p, customer_id, dims)"""


def delete_meter(conn: Any, slug: str) -> None:
    """Delete a meter's rows at every level (a rebuild recomputes all of them)."""
    for table in ("usage_minute_aggregates", *(t for t, _, _ in ROLLUPS.values())):
        conn.execute(f"DELETE FROM {table} WHERE meter_slug = %s", (slug,))
