"""Data-quality checks as plain SQL over PostgreSQL (no Dagster import).

Each check returns a :class:`~meter_platform.quality.registry.CheckOutcome` of a check named in the
registry; ``quality.outcomes.record`` stores it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from meter_platform.catalog import Meter
from meter_platform.config import QualitySettings
from meter_platform.meters.aggregates import minute_aggregates_sql
from meter_platform.meters.rollups import ROLLUPS, rollup_mismatches_sql
from meter_platform.quality import registry
from meter_platform.quality.registry import CheckOutcome


def reconcile_aggregates(
    conn: psycopg.Connection, meters: list[Meter], settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """Closed minute windows of the aggregates equal a recomputation from the raw events, and the hourly
    and daily rollups of the lookback equal the sums of their minutes.

    Runs in one repeatable-read snapshot: raw rows and aggregates (all levels) are committed together by
    the pipeline, so any difference is real (a lost or doubled upsert, or a tampered row).
    """
    now = now or datetime.now(UTC)
    start, end = now - settings.lookback, now - settings.closed_after
    mismatches: list[dict[str, Any]] = []
    rollup_mismatches: list[dict[str, Any]] = []
    compared = rollups_compared = 0
    for meter in meters:
        rows = _compare_with_raw_events(conn, meter, start, end)
        compared += len(rows)
        mismatches.extend(_mismatch(meter, row) for row in rows if row[-1])
        for level in ROLLUPS:
            rows = conn.execute(
                rollup_mismatches_sql(level), {"slug": meter.slug, "start": start, "end": now}
            ).fetchall()
            rollups_compared += len(rows)
            rollup_mismatches.extend(_mismatch(meter, row, level) for row in rows if row[-1])
    description = f"{compared} closed minute windows of {len(meters)} meters equal their raw events"
    if mismatches:
        description = (
            f"{len(mismatches)} of {compared} closed minute windows differ from a recomputation from raw "
            f"events (first: meter {mismatches[0]['meter']}, minute {mismatches[0]['minute']}, customer "
            f"{mismatches[0]['customer_id']}); rebuild with `meter replay {mismatches[0]['meter']}`"
        )
    if rollup_mismatches:
        first = rollup_mismatches[0]
        description += (
            f"; {len(rollup_mismatches)} of {rollups_compared} hourly/daily rollups differ from the sums of"
            f" their minutes (first: meter {first['meter']}, {first['level']} {first['minute']}, customer"
            f" {first['customer_id']}); rebuild with `meter replay {first['meter']}`"
        )
    else:
        description += f"; {rollups_compared} hourly/daily rollups equal the sums of their minutes"
    return registry.outcome(
        "aggregates_reconcile_with_raw_events",
        not mismatches and not rollup_mismatches,
        description,
        {
            "windows_compared": compared,
            "mismatches": len(mismatches),
            "first_mismatches": mismatches[:10],
            "rollups_compared": rollups_compared,
            "rollup_mismatches": len(rollup_mismatches),
            "first_rollup_mismatches": rollup_mismatches[:10],
            "from": start.isoformat(),
            "to": end.isoformat(),
        },
    )


def _compare_with_raw_events(
    conn: psycopg.Connection, meter: Meter, start: datetime, end: datetime
) -> list[tuple[Any, ...]]:
    """One meter's minute windows in [start, end), aggregates against a recomputation from raw events:
    (minute, customer, dims, raw count, aggregate count, raw sum, aggregate sum, differs) each."""
    params: dict[str, Any] = {"slug": meter.slug, "start": start, "end": end}
    recomputed = minute_aggregates_sql(
        meter,
        "usage_events",
        params,
        "AND ts >= date_trunc('minute', CAST(%(start)s AS timestamptz))"
        " AND ts < date_trunc('minute', CAST(%(end)s AS timestamptz))",
    )
    return conn.execute(
        f"""
        WITH raw AS ({recomputed}
        ), agg AS (
            SELECT minute, customer_id, dims, event_count, value_count, value_sum, value_min, value_max
            FROM usage_minute_aggregates WHERE meter_slug = %(slug)s
              AND minute >= date_trunc('minute', CAST(%(start)s AS timestamptz))
              AND minute < date_trunc('minute', CAST(%(end)s AS timestamptz))
        )
        SELECT coalesce(raw.minute, agg.minute), coalesce(raw.customer_id, agg.customer_id),
               coalesce(raw.dims, agg.dims), raw.event_count, agg.event_count, raw.value_sum, agg.value_sum,
               (raw.minute IS NULL OR agg.minute IS NULL
                OR raw.event_count <> agg.event_count OR raw.value_count <> agg.value_count
                OR raw.value_sum IS DISTINCT FROM agg.value_sum OR raw.value_min IS DISTINCT FROM agg.value_min
                OR raw.value_max IS DISTINCT FROM agg.value_max) AS differs
        FROM raw FULL OUTER JOIN agg USING (minute, customer_id, dims)
        """,
        params,
    ).fetchall()


def _mismatch(meter: Meter, row: tuple[Any, ...], level: str | None = None) -> dict[str, Any]:
    """A differing window as the check's metadata lists it (a rollup's: its level, minutes' values as
    ``raw_``, the rollup's as ``aggregate_``)."""
    minute, customer, dims, raw_count, agg_count, raw_sum, agg_sum, _ = row
    return {
        "meter": meter.slug,
        **({"level": level} if level else {}),
        "minute": minute.isoformat(),
        "customer_id": customer,
        "dims": dims,
        "raw_count": raw_count,
        "aggregate_count": agg_count,
        "raw_sum": str(raw_sum) if raw_sum is not None else None,
        "aggregate_sum": str(agg_sum) if agg_sum is not None else None,
    }


def ledger_continuity(conn: psycopg.Connection, ack_floor: int, stream_created: datetime) -> CheckOutcome:
    """Every JetStream sequence the consumer acked (1..ack_floor) of the current stream (created at
    ``stream_created``) is in the ledger, none missing, each balanced.

    A missing sequence is a message that was acked without being committed: events lost.
    """
    row = conn.execute(
        "SELECT count(*), coalesce(max(stream_seq), 0) FROM ingest_messages"
        " WHERE stream_created = %s AND stream_seq <= %s",
        (stream_created, ack_floor),
    ).fetchone()
    present, _ = row if row else (0, 0)
    missing = ack_floor - int(present)
    gaps = conn.execute(
        """
        SELECT prev + 1 AS gap_start, stream_seq - 1 AS gap_end FROM (
            SELECT stream_seq, coalesce(lag(stream_seq) OVER (ORDER BY stream_seq), 0) AS prev
            FROM ingest_messages WHERE stream_created = %(created)s AND stream_seq <= %(floor)s
            UNION ALL SELECT %(floor)s + 1, (SELECT coalesce(max(stream_seq), 0) FROM ingest_messages
                                             WHERE stream_created = %(created)s AND stream_seq <= %(floor)s)
        ) s WHERE stream_seq - prev > 1 ORDER BY 1 LIMIT 10
        """,
        {"floor": ack_floor, "created": stream_created},
    ).fetchall()
    unbalanced = conn.execute(
        "SELECT count(*) FROM ingest_messages WHERE events <> stored + duplicates + quarantined"
    ).fetchone()
    bad_rows = int(unbalanced[0]) if unbalanced else 0
    passed = missing == 0 and bad_rows == 0
    if passed:
        description = f"all {ack_floor} acked JetStream messages are in the ledger, each balanced"
    else:
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gaps)
        description = (
            f"{missing} acked JetStream message(s) are missing from the ledger (sequences {ranges or '?'}): "
            "their events were acked without being stored"
            if missing
            else f"{bad_rows} ledger rows do not balance (events != stored + duplicates + quarantined)"
        )
    return registry.outcome(
        "ledger_continuity",
        passed,
        description,
        {
            "ack_floor": ack_floor,
            "stream_created": stream_created.isoformat(),
            "missing_sequences": missing,
            "gaps": [list(g) for g in gaps],
            "unbalanced_messages": bad_rows,
        },
    )


def freshness(
    conn: psycopg.Connection, meters: list[Meter], settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """The newest stored event of each meter's event type is recent enough."""
    now = now or datetime.now(UTC)
    types = sorted({m.event_type for m in meters})
    newest: dict[str, datetime] = dict(
        conn.execute(
            "SELECT event_type, max(received_at) FROM usage_events WHERE event_type = ANY(%s) GROUP BY 1",
            (types,),
        ).fetchall()
    )
    stale = {}
    ages = {}
    for meter in meters:
        last = newest.get(meter.event_type)
        if last is None:
            continue  # a meter that never had an event is not stale, just unused
        age = now - last
        ages[meter.slug] = round(age.total_seconds())
        if age > settings.freshness:
            stale[meter.slug] = round(age.total_seconds())
    description = (
        f"{len(stale)} meter(s) have no event newer than {settings.freshness}: "
        + ", ".join(f"{k} ({v // 60} min)" for k, v in sorted(stale.items()))
        if stale
        else f"every meter with events got one within {settings.freshness}"
    )
    return registry.outcome(
        "freshness",
        not stale,
        description,
        {"age_seconds": ages, "stale": stale, "threshold_seconds": settings.freshness.total_seconds()},
    )


def volume_anomaly(
    conn: psycopg.Connection, meters: list[Meter], settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """Each meter's last 24 hours against the mean of its trailing 7 days (with enough history)."""
    now = now or datetime.now(UTC)
    rows = conn.execute(
        """
        SELECT meter_slug,
               coalesce(sum(event_count) FILTER (WHERE minute >= %(day)s), 0) AS today,
               coalesce(sum(event_count) FILTER (WHERE minute < %(day)s), 0) AS before,
               count(DISTINCT date_trunc('day', minute - (%(now)s - date_trunc('day', %(now)s))))
                   FILTER (WHERE minute < %(day)s) AS days
        FROM usage_minute_aggregates
        WHERE minute >= %(week)s AND minute < %(now)s AND meter_slug = ANY(%(slugs)s)
        GROUP BY 1
        """,
        {
            "now": now,
            "day": now - timedelta(days=1),
            "week": now - timedelta(days=8),
            "slugs": [m.slug for m in meters],
        },
    ).fetchall()
    anomalies, observed = {}, {}
    for slug, today, before, days in rows:
        if days < settings.volume_min_days:
            continue
        mean = Decimal(before) / 7
        observed[slug] = {"last_24h": int(today), "trailing_daily_mean": float(round(mean, 1))}
        if mean > 0 and not (
            mean / Decimal(settings.volume_factor) <= today <= mean * Decimal(settings.volume_factor)
        ):
            anomalies[slug] = observed[slug]
    description = (
        f"{len(anomalies)} meter(s) are off their trailing volume by more than x{settings.volume_factor:g}: "
        + ", ".join(f"{k} ({v['last_24h']} vs {v['trailing_daily_mean']}/day)" for k, v in anomalies.items())
        if anomalies
        else f"{len(observed)} meter(s) with {settings.volume_min_days}+ days of history are within "
        f"x{settings.volume_factor:g} of their trailing daily mean"
    )
    return registry.outcome(
        "volume_anomaly",
        not anomalies,
        description,
        {"meters": observed, "anomalies": anomalies},
    )


def ingest_rates(
    conn: psycopg.Connection, settings: QualitySettings, now: datetime | None = None
) -> list[CheckOutcome]:
    """Quarantine and duplicate rates of the batches committed in the last 24 hours."""
    now = now or datetime.now(UTC)
    row = conn.execute(
        "SELECT coalesce(sum(events), 0), coalesce(sum(duplicates), 0), coalesce(sum(quarantined), 0)"
        " FROM ingest_batches WHERE committed_at >= %s",
        (now - timedelta(days=1),),
    ).fetchone()
    events, duplicates, quarantined = (int(v) for v in row) if row else (0, 0, 0)
    out = []
    for name, count, limit in (
        ("quarantine_rate", quarantined, settings.max_quarantine_rate),
        ("duplicate_rate", duplicates, settings.max_duplicate_rate),
    ):
        rate = count / events if events else 0.0
        passed = rate <= limit
        what = name.split("_")[0]
        out.append(
            registry.outcome(
                name,
                passed,
                f"{count} of {events} events in the last 24 h were {what}d ({rate:.1%}; the limit is {limit:.0%})"
                if what == "duplicate"
                else f"{count} of {events} events in the last 24 h were quarantined ({rate:.1%}; the limit is {limit:.0%})",
                {"events": events, name.replace("_rate", ""): count, "rate": round(rate, 4), "limit": limit},
            )
        )
    return out


def usage_without_subscription(
    conn: psycopg.Connection, settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """Customers with usage in the lookback window that no subscription covers: billing would never
    see it. Passes while no subscription exists at all (billing is not in use)."""
    now = now or datetime.now(UTC)
    if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM subscriptions)").fetchone() == (True,):
        return registry.outcome(
            "usage_without_subscription", True, "no subscriptions: billing is not in use", {"billing": False}
        )
    rows = conn.execute(
        "SELECT a.customer_id, count(DISTINCT a.meter_slug), min(a.minute) FROM usage_minute_aggregates a"
        " WHERE a.minute >= %s AND a.event_count > 0 AND NOT EXISTS (SELECT 1 FROM subscriptions s"
        "   WHERE s.customer_id = a.customer_id AND s.starts_at <= a.minute"
        "   AND (s.ends_at IS NULL OR s.ends_at > a.minute))"
        " GROUP BY a.customer_id ORDER BY a.customer_id LIMIT 50",
        (now - settings.lookback,),
    ).fetchall()
    sample = [{"customer_id": c, "meters": m, "first_minute": f.isoformat()} for c, m, f in rows]
    return registry.outcome(
        "usage_without_subscription",
        not rows,
        f"{len(rows)} customer(s) have usage no subscription covers, e.g. {rows[0][0]} from {rows[0][2].isoformat()};"
        " subscribe them (PUT /v1/customers/{id} with a plan) or their usage is never billed"
        if rows
        else "every customer with recent usage has a subscription covering it",
        {"billing": True, "uncovered": sample[:20]},
    )
