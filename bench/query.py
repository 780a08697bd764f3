"""Usage queries at volume: a month of raw events (20 million by default) loaded into a fresh platform,
then the usage API timed for the two questions billing and dashboards ask most.

Run with ``.venv/bin/python bench/query.py [--events N]``. It starts NATS, PostgreSQL and the gateway
as ``make bench`` does (``stack.py``), loads the events in chunks (generated inside PostgreSQL, inserted
into their day partitions of ``usage_events`` with their ids in ``event_ids``, as the writer stores them,
and aggregated with the pipeline's own upsert, ``aggregate_upsert_sql``, which writes the minutes and
their hourly and daily rollups: the tables end up as ingestion would leave them), runs ANALYZE, and
then, warm cache, times over the gateway:

* **one customer's month by day**: ``GET /v1/meters/api_calls/usage?customer_id=C&window=day``
* **all customers' month by customer**: ``GET /v1/meters/api_calls/usage?group_by=customer_id``

It prints p50/p95 over ``--calls`` calls each and never fails on speed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
from report import pct, say
from stack import Stack

from meter_platform.meters.aggregates import active_meters, aggregate_upsert_sql, psycopg_bind
from meter_platform.meters.usage import build_query, usage_sql
from meter_platform.storage import db
from meter_platform.storage.partitions import ensure_day_partitions

# The minutes and, since migration 0009, their hourly and daily rollups (absent before it).
AGGREGATE_TABLES = ("usage_minute_aggregates", "usage_hour_aggregates", "usage_day_aggregates")
TARGETS = {"one customer, month by day": 0.050, "all customers, month by customer": 0.200}


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The last whole calendar month before ``now`` (UTC): [start, end)."""
    end = datetime(now.year, now.month, 1, tzinfo=UTC)
    start = datetime(end.year - (end.month == 1), 12 if end.month == 1 else end.month - 1, 1, tzinfo=UTC)
    return start, end


_GENERATE = """
INSERT INTO new_events (id, event_type, customer_id, ts, properties, stream_seq)
SELECT 'q-' || i, 'api_call', 'cust-' || (i %% %(customers)s),
       %(start)s::timestamptz + (%(end)s::timestamptz - %(start)s::timestamptz) * (i::float8 / %(total)s),
       jsonb_build_object('endpoint', '/v1/e' || (i %% 10), 'method', CASE WHEN i %% 3 = 0 THEN 'POST' ELSE 'GET' END,
                          'region', 'r' || (i %% %(customers)s %% 4), 'bytes_transferred', i %% 5000,
                          'response_time_ms', i %% 300),
       0
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i
"""


def load(database_url: str, args: argparse.Namespace, start: datetime, end: datetime) -> float:
    """Load ``args.events`` events spread over [start, end) with their aggregates; seconds taken."""
    began = time.perf_counter()
    with db.connect(database_url) as conn:
        # Raw events are partitioned by day: every day of the month needs its partition first.
        ensure_day_partitions(conn, [(start + timedelta(days=d)).date() for d in range((end - start).days)])
        conn.execute(
            "CREATE TEMP TABLE new_events (id text, event_type text, customer_id text, ts timestamptz,"
            " properties jsonb, stream_seq bigint)"
        )
        meters = active_meters(conn)
        for first in range(0, args.events, args.chunk):
            last = min(args.events, first + args.chunk) - 1
            params = {"customers": args.customers, "start": start, "end": end, "total": args.events}
            conn.execute(_GENERATE, {**params, "first": first, "last": last})
            # As the writer stores them: each id in event_ids (the dedup key), the row in its day's partition.
            conn.execute("INSERT INTO event_ids (id, ts) SELECT id, ts FROM new_events")
            conn.execute(
                "INSERT INTO usage_events (id, event_type, customer_id, ts, received_at, properties, stream_seq)"
                " SELECT id, event_type, customer_id, ts, ts, properties, stream_seq FROM new_events"
            )
            for meter in meters:
                conn.execute(*aggregate_upsert_sql(meter, "new_events"))
            conn.execute("TRUNCATE new_events")
            conn.commit()
            say(f"loaded {last + 1:,} / {args.events:,} events ({time.perf_counter() - began:.0f} s)")
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE usage_events")
        conn.execute("ANALYZE event_ids")
        for table in AGGREGATE_TABLES:
            conn.execute(f"ANALYZE {table}")
        # A partitioned table's own size is 0: sum its partitions (pg_partition_tree has no rows for a
        # table that is not partitioned).
        tables = ("usage_events", "event_ids", *AGGREGATE_TABLES)
        sizes = [
            conn.execute(
                f"SELECT count(*), pg_size_pretty(coalesce((SELECT sum(pg_total_relation_size(relid))"
                f" FROM pg_partition_tree('{table}')), pg_total_relation_size('{table}'))) FROM {table}"
            ).fetchone()
            for table in tables
        ]
    say("; ".join(f"{table} {n:,} rows {size}" for table, (n, size) in zip(tables, sizes, strict=True)))
    return time.perf_counter() - began


def explain(database_url: str, queries: dict[str, dict[str, str]]) -> None:
    """Print the plan of each query as the usage API runs it (EXPLAIN ANALYZE)."""
    with db.connect(database_url, autocommit=True) as conn:
        meter = next(m for m in active_meters(conn) if m.slug == "api_calls")
        for name, params in queries.items():
            sql, binds = usage_sql(build_query(meter, params), psycopg_bind)
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, binds).fetchall()
            say(f"plan of {name}:\n" + "\n".join(r[0] for r in plan))


def time_calls(client: httpx.Client, params: dict[str, str], calls: int) -> list[float]:
    """Seconds per call of the usage API (after a few warm-up calls)."""
    for _ in range(3):
        client.get("/v1/meters/api_calls/usage", params=params).raise_for_status()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        answer = client.get("/v1/meters/api_calls/usage", params=params)
        times.append(time.perf_counter() - t0)
        answer.raise_for_status()
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20_000_000, help="raw events loaded (one month)")
    p.add_argument("--customers", type=int, default=1000, help="distinct customers")
    p.add_argument("--chunk", type=int, default=1_000_000, help="events per load transaction")
    p.add_argument("--calls", type=int, default=100, help="timed calls per query")
    p.add_argument("--tmp-dir", help="parent folder of the temp dir (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir afterwards")
    p.add_argument("--explain", action="store_true", help="print each query's plan before timing it")
    args = p.parse_args(argv)
    args.gateway_workers = 1  # what Stack needs beside these
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    stack = Stack(args)
    start, end = month_bounds(datetime.now(UTC))
    try:
        stack.start()
        assert stack.pg is not None
        seconds = load(stack.pg.url, args, start, end)
        month = {"from": start.isoformat(), "to": end.isoformat()}
        queries = {
            "one customer, month by day": {**month, "customer_id": "cust-7", "window": "day"},
            "all customers, month by customer": {**month, "group_by": "customer_id"},
            # Not a target: Berlin days are not UTC days, so this one reads hourly rollups.
            "one customer, month by Berlin day": {
                **month,
                "customer_id": "cust-7",
                "window": "day",
                "tz": "Europe/Berlin",
            },
        }
        if args.explain:
            explain(stack.pg.url, queries)
        with httpx.Client(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=120) as client:
            results = {name: time_calls(client, params, args.calls) for name, params in queries.items()}
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        stack.stop()
    print()
    print(
        f"USAGE QUERIES AT VOLUME  ({args.events:,} raw events over {start:%Y-%m}, {args.customers} customers;"
    )
    print(f"loaded with their aggregates in {seconds:.0f} s; warm cache, {args.calls} calls each, over HTTP)")
    for name, times in results.items():
        p50, p95 = pct(times, 50), pct(times, 95)
        target = TARGETS.get(name)
        versus = f"target p95 <= {target * 1000:.0f} ms: {p95 / target:.2f} of it" if target else "no target"
        print(f"  {name:34} p50 {p50 * 1000:8.1f} ms  p95 {p95 * 1000:8.1f} ms  {versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
