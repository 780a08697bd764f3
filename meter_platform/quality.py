"""Data-quality checks as plain functions over PostgreSQL (no Dagster import), and their record.

Each check returns a :class:`CheckOutcome`; ``record`` stores it in ``quality_check_results``, which the
alert sensor reads. ERROR outcomes of reconciliation and ledger continuity block finalizing invoices
(:func:`blocking_failures`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import yaml

from meter_platform.catalog import Catalog, Meter
from meter_platform.db import sqlalchemy_url
from meter_platform.meters import minute_aggregates_sql

#: Checks whose failure (severity ERROR) blocks finalizing invoices.
BLOCKING_CHECKS = ("aggregates_reconcile_with_raw_events", "ledger_continuity")


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check evaluation."""

    check_name: str
    asset: str
    passed: bool
    severity: str  # "ERROR" or "WARN"
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def record(conn: psycopg.Connection, outcome: CheckOutcome, run_id: str | None = None) -> None:
    """Store one evaluation (the caller commits)."""
    conn.execute(
        "INSERT INTO quality_check_results (check_name, asset, passed, severity, description, metadata, run_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            outcome.check_name,
            outcome.asset,
            outcome.passed,
            outcome.severity,
            outcome.description,
            json.dumps(outcome.metadata, default=str),
            run_id,
        ),
    )


def latest_outcomes(conn: psycopg.Connection) -> list[CheckOutcome]:
    """The newest evaluation of every check."""
    rows = conn.execute(
        "SELECT DISTINCT ON (asset, check_name) check_name, asset, passed, severity, description, metadata"
        " FROM quality_check_results ORDER BY asset, check_name, evaluated_at DESC, result_id DESC"
    ).fetchall()
    return [CheckOutcome(*row) for row in rows]


def blocking_failures(conn: psycopg.Connection) -> list[CheckOutcome]:
    """Failing ERROR checks that must be fixed before invoices are finalized."""
    return [
        o
        for o in latest_outcomes(conn)
        if not o.passed and o.severity == "ERROR" and o.check_name in BLOCKING_CHECKS
    ]


# --- the checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the checks (environment: ``METER_QUALITY_*``)."""

    lookback: timedelta = timedelta(hours=48)  # how far back reconciliation and ranges look
    closed_after: timedelta = timedelta(minutes=1)  # a minute window is closed this long after it ends
    freshness: timedelta = timedelta(hours=1)
    max_quarantine_rate: float = 0.05
    max_duplicate_rate: float = 0.20
    volume_factor: float = 3.0  # today vs the trailing daily mean: outside [mean/f, mean*f] is an anomaly
    volume_min_days: int = 3

    @classmethod
    def from_env(cls) -> QualitySettings:
        """Read overrides from the environment."""
        env = os.environ.get
        return cls(
            lookback=timedelta(hours=float(env("METER_QUALITY_LOOKBACK_HOURS", "48"))),
            freshness=timedelta(minutes=float(env("METER_QUALITY_FRESHNESS_MINUTES", "60"))),
            max_quarantine_rate=float(env("METER_QUALITY_MAX_QUARANTINE_RATE", "0.05")),
            max_duplicate_rate=float(env("METER_QUALITY_MAX_DUPLICATE_RATE", "0.20")),
            volume_factor=float(env("METER_QUALITY_VOLUME_FACTOR", "3")),
        )


def reconcile_aggregates(
    conn: psycopg.Connection, meters: list[Meter], settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """Closed minute windows of the aggregates equal a recomputation from the raw events.

    Runs in one repeatable-read snapshot: raw rows and aggregates are committed together by the
    pipeline, so any difference is real (a lost or doubled upsert, or a tampered row).
    """
    now = now or datetime.now(UTC)
    start, end = now - settings.lookback, now - settings.closed_after
    mismatches: list[dict[str, Any]] = []
    compared = 0
    for meter in meters:
        params: dict[str, Any] = {"slug": meter.slug, "start": start, "end": end}
        recomputed = minute_aggregates_sql(
            meter,
            "usage_events",
            params,
            "AND ts >= date_trunc('minute', CAST(%(start)s AS timestamptz))"
            " AND ts < date_trunc('minute', CAST(%(end)s AS timestamptz))",
        )
        rows = conn.execute(
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
        compared += len(rows)
        for minute, customer, dims, raw_count, agg_count, raw_sum, agg_sum, differs in rows:
            if differs:
                mismatches.append(
                    {
                        "meter": meter.slug,
                        "minute": minute.isoformat(),
                        "customer_id": customer,
                        "dims": dims,
                        "raw_count": raw_count,
                        "aggregate_count": agg_count,
                        "raw_sum": str(raw_sum) if raw_sum is not None else None,
                        "aggregate_sum": str(agg_sum) if agg_sum is not None else None,
                    }
                )
    if mismatches:
        description = (
            f"{len(mismatches)} of {compared} closed minute windows differ from a recomputation from raw "
            f"events (first: meter {mismatches[0]['meter']}, minute {mismatches[0]['minute']}, customer "
            f"{mismatches[0]['customer_id']}); rebuild with `meter replay {mismatches[0]['meter']}`"
        )
    else:
        description = f"{compared} closed minute windows of {len(meters)} meters equal their raw events"
    return CheckOutcome(
        "aggregates_reconcile_with_raw_events",
        "usage_minute_aggregates",
        not mismatches,
        "ERROR",
        description,
        {
            "windows_compared": compared,
            "mismatches": len(mismatches),
            "first_mismatches": mismatches[:10],
            "from": start.isoformat(),
            "to": end.isoformat(),
        },
    )


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
    return CheckOutcome(
        "ledger_continuity",
        "usage_events",
        passed,
        "ERROR",
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
    return CheckOutcome(
        "freshness",
        "usage_events",
        not stale,
        "WARN",
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
    return CheckOutcome(
        "volume_anomaly",
        "usage_minute_aggregates",
        not anomalies,
        "WARN",
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
            CheckOutcome(
                name,
                "quarantined_events" if what == "quarantine" else "usage_events",
                passed,
                "WARN",
                f"{count} of {events} events in the last 24 h were {what}d ({rate:.1%}; the limit is {limit:.0%})"
                if what == "duplicate"
                else f"{count} of {events} events in the last 24 h were quarantined ({rate:.1%}; the limit is {limit:.0%})",
                {"events": events, name.replace("_rate", ""): count, "rate": round(rate, 4), "limit": limit},
            )
        )
    return out


def expectation_checks(database_url: str, catalog: Catalog, settings: QualitySettings) -> list[CheckOutcome]:
    """The checks great-expectations runs against PostgreSQL.

    - ``no_negative_quantities``: event and value counts of every meter, and sums of meters whose value
      property is declared ``min >= 0``, are never negative;
    - ``values_within_declared_ranges``: stored events' numeric properties respect events.yaml's min/max;
    - ``every_customer_known``: every customer with usage is listed in ``customers.yaml`` (when the
      catalog has one; without it, every customer is accepted and the check says so).

    great-expectations costs seconds to import, so it is imported here, never on the ingestion path.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in run logs
    source = context.data_sources.add_postgres(
        "meter", connection_string=sqlalchemy_url(database_url, driver="psycopg2")
    )
    since = f"now() - interval '{int(settings.lookback.total_seconds())} seconds'"
    counter = iter(range(1_000_000))

    def validate(query: str, expectation: Any) -> Any:
        asset = source.add_query_asset(f"q{next(counter)}", query=query)
        batch = asset.add_batch_definition_whole_table("all").get_batch()
        return batch.validate(expectation)

    def unexpected(result: Any) -> tuple[int, list[Any]]:
        return int(result.result.get("unexpected_count") or 0), list(
            result.result.get("partial_unexpected_list") or []
        )

    outcomes: list[CheckOutcome] = []
    # 1. No negative quantities.
    non_negative_sums = []
    for meter in catalog.meters:
        spec = catalog.event_types.get(meter.event_type)
        prop = next((p for p in spec.properties if p.name == meter.value_property), None) if spec else None
        if meter.aggregation == "sum" and prop is not None and prop.min is not None and prop.min >= 0:
            non_negative_sums.append(meter.slug)
    found: dict[str, Any] = {}
    for column, slugs in (("event_count", None), ("value_count", None), ("value_sum", non_negative_sums)):
        where = f"minute >= {since}" + (
            f" AND meter_slug IN ({', '.join(repr(s) for s in slugs)})" if slugs else ""
        )
        if slugs == []:
            continue
        count, sample = unexpected(
            validate(
                f"SELECT {column} FROM usage_minute_aggregates WHERE {where}",
                gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0),
            )
        )
        if count:
            found[column] = {"rows": count, "sample": [str(v) for v in sample[:5]]}
    outcomes.append(
        CheckOutcome(
            "no_negative_quantities",
            "usage_minute_aggregates",
            not found,
            "ERROR",
            "negative quantities in " + ", ".join(f"{k} ({v['rows']} rows)" for k, v in found.items())
            if found
            else "no negative counts or sums in the aggregates",
            {"negative": found, "non_negative_sum_meters": non_negative_sums},
        )
    )
    # 2. Values within the ranges events.yaml declares.
    out_of_range: dict[str, Any] = {}
    checked = 0
    for spec in catalog.event_types.values():
        for prop in spec.properties:
            if prop.type not in ("integer", "number") or (prop.min is None and prop.max is None):
                continue
            checked += 1
            path = "{" + ",".join(prop.name.split(".")) + "}"
            count, sample = unexpected(
                validate(
                    f"SELECT CAST(properties #>> '{path}' AS numeric) AS v FROM usage_events"
                    f" WHERE event_type = '{spec.name}' AND jsonb_typeof(properties #> '{path}') = 'number'"
                    f" AND received_at >= {since}",
                    gxe.ExpectColumnValuesToBeBetween(column="v", min_value=prop.min, max_value=prop.max),
                )
            )
            if count:
                out_of_range[f"{spec.name}.{prop.name}"] = {
                    "rows": count,
                    "sample": [str(v) for v in sample[:5]],
                }
    outcomes.append(
        CheckOutcome(
            "values_within_declared_ranges",
            "usage_events",
            not out_of_range,
            "ERROR",
            "stored values outside their declared range: " + ", ".join(out_of_range)
            if out_of_range
            else f"{checked} declared numeric ranges hold for the stored events",
            {"properties_checked": checked, "out_of_range": out_of_range},
        )
    )
    # 3. Every customer known.
    known = catalog_customers(catalog)
    if known is None:
        outcomes.append(
            CheckOutcome(
                "every_customer_known",
                "usage_events",
                True,
                "WARN",
                "no customers.yaml in the catalog: every customer id is accepted",
                {"registry": False},
            )
        )
    else:
        count, sample = unexpected(
            validate(
                f"SELECT DISTINCT customer_id FROM usage_minute_aggregates WHERE minute >= {since}",
                gxe.ExpectColumnValuesToBeInSet(column="customer_id", value_set=sorted(known)),
            )
        )
        outcomes.append(
            CheckOutcome(
                "every_customer_known",
                "usage_events",
                count == 0,
                "WARN",
                f"{count} customer(s) with usage are not in customers.yaml, e.g. {', '.join(map(str, sample[:5]))}"
                if count
                else f"every customer with usage is one of the {len(known)} in customers.yaml",
                {"registry": True, "unknown_customers": count, "sample": [str(v) for v in sample[:20]]},
            )
        )
    return outcomes


def catalog_customers(catalog: Catalog) -> set[str] | None:
    """The customer ids of ``customers.yaml`` in the catalog folder, or None when there is none."""
    if catalog.directory is None:
        return None
    path = catalog.directory / "customers.yaml"
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return {str(c["id"] if isinstance(c, dict) else c) for c in data.get("customers") or []}
