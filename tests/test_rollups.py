"""Hourly and daily rollups: usage answers read from them equal the plain-Python reference, the coarsest
rows that fit are the ones read, duplicates and redeliveries do not change them, a rebuild and the
migration's backfill leave them equal to their minutes, and the reconciliation check catches a damaged one.

Events go through the real micro-batch writer into the session's PostgreSQL (no mocks).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from meter_platform import quality
from meter_platform.capture.envelope import GatewayBatch, datetime_to_us, encode_batch
from meter_platform.capture.messages import Message
from meter_platform.config import BATCH_HEADER, GATEWAY_SUBJECT
from meter_platform.ingestion.quarantine_replay import replay_quarantine
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.meters.aggregates import MeterChange, aggregate_upsert_sql, psycopg_bind
from meter_platform.meters.rebuild import replay_meter, sync_meters
from meter_platform.meters.rollups import ROLLUPS, rollup_mismatches_sql
from meter_platform.meters.usage import UsageQuery, usage_sql
from meter_platform.storage import db
from tests.conftest import TABLES
from tests.test_meters_exact import BASES, CATALOG, SPAN_US, Ev, Q, _answer, reference

BASE = BASES[0]  # 2026-10-24 20:00 UTC: Europe/Berlin leaves summer time on the 25th at 01:00 UTC
HOUR_US = 3_600_000_000
NUMERIC = ["requests", "amount_sum", "amount_min", "amount_max", "amount_avg", "pro_tokens", "eu_us_requests"]
# [start, length) in microseconds from BASE: whole UTC days, unaligned, and the whole span.
RANGES = [
    (4 * HOUR_US, 48 * HOUR_US),  # 2026-10-25 and -26, exactly
    (4 * HOUR_US - 1, 48 * HOUR_US + 2),  # a microsecond more on each side
    (123_456_789, SPAN_US - 2 * 123_456_789),  # unaligned, not even to the second
    (3 * HOUR_US + 30 * 60_000_000, 50 * HOUR_US),  # from a half hour, for Asia/Kolkata
    (-HOUR_US, SPAN_US + 2 * HOUR_US),
]


def _events(rng: random.Random, n: int, ids: int) -> list[Ev]:
    """``n`` random events over the span; ids drawn from ``ids`` so resends happen."""
    return [
        Ev(
            id=f"e{rng.randrange(ids)}",
            customer=rng.choice(["c1", "c2", "c3"]),
            offset_us=rng.choice(
                [rng.randrange(SPAN_US), rng.randrange(SPAN_US), 4 * HOUR_US, 28 * HOUR_US - 1]
            ),
            region=rng.choice(["eu", "us", "ap", None]),
            tier=rng.choice(["free", "pro", None]),
            amount=rng.choice([None, rng.randint(-1000, 1000), round(rng.uniform(-1000, 1000), 2)]),
            user=rng.choice(["u1", "u2", None]),
            tokens=rng.choice([None, rng.randint(0, 10_000)]),
        )
        for _ in range(n)
    ]


def _send(
    database_url: str, evs: list[Ev], first_seq: int = 1, chunk: int = 20, late: timedelta | None = None
) -> None:
    """The events through the micro-batch writer, ``chunk`` per message, three messages per batch
    (with ``late``, events older than that when received are quarantined as too late)."""
    writer = MicroBatchWriter(CATALOG, database_url, late)
    received = datetime_to_us(BASE + timedelta(days=4))
    messages = []
    for seq, i in enumerate(range(0, len(evs), chunk), first_seq):
        batch = GatewayBatch(received_at=received, events=[e.event(BASE) for e in evs[i : i + chunk]])
        messages.append(Message(seq, GATEWAY_SUBJECT, encode_batch(batch), {BATCH_HEADER: "1"}, received))
    try:
        for n in range(0, len(messages), 3):
            assert writer.write(messages[n : n + 3]).balanced
    finally:
        writer.close()


@pytest.fixture
def fresh(database_url: str) -> str:
    """Empty tables, the test catalog's meters active."""
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        sync_meters(conn, CATALOG)
    return database_url


def _stored(evs: list[Ev]) -> list[tuple[Ev, Any]]:
    first: dict[str, tuple[Ev, Any]] = {}
    for ev in evs:
        first.setdefault(ev.id, (ev, ev.event(BASE)))
    return list(first.values())


def _mismatches(conn: Any) -> tuple[int, int]:
    """(rollup rows compared, rows differing from the sums of their minutes), every meter, all time."""
    compared = differing = 0
    for meter in CATALOG.meters:
        for level in ROLLUPS:
            params = {
                "slug": meter.slug,
                "start": BASE - timedelta(days=30),
                "end": BASE + timedelta(days=30),
            }
            rows = conn.execute(rollup_mismatches_sql(level), params).fetchall()
            compared += len(rows)
            differing += sum(1 for r in rows if r[-1])
    return compared, differing


def _rollup_rows(conn: Any) -> list[tuple]:
    return [
        row
        for table, time, _ in ROLLUPS.values()
        for row in conn.execute(
            f"SELECT meter_slug, {time}, customer_id, dims, event_count, value_count, value_sum, value_min,"
            f" value_max FROM {table} ORDER BY 1, 2, 3, 4::text"
        ).fetchall()
    ]


def test_answers_with_rollups_equal_the_reference(fresh):
    rng = random.Random(20261025)
    evs = _events(rng, 600, 450)
    _send(fresh, evs)
    stored = _stored(evs)
    with db.connect(fresh) as conn:
        assert conn.execute("SELECT count(*) FROM usage_day_aggregates").fetchone()[0] > 0
        checked = 0
        for slug in NUMERIC:
            meter = CATALOG.meter(slug)
            assert meter is not None
            for window in (None, "minute", "hour", "day", "month"):
                for tz in ("UTC", "Europe/Berlin", "Asia/Kolkata"):
                    start_us, length_us = rng.choice(RANGES)
                    group_by = rng.choice([(), ("customer_id",), tuple(meter.dimensions[-1:])])
                    q = Q(slug, window, tz, start_us, length_us, group_by, rng.choice([None, "c2"]))
                    assert _answer(conn, meter, q, BASE) == reference(stored, meter, q, BASE), q
                    checked += 1
    assert checked == len(NUMERIC) * 15


def _total(conn: Any, window: str | None, tz: str, start: datetime, end: datetime) -> int:
    meter = CATALOG.meter("requests")
    assert meter is not None
    sql, params = usage_sql(UsageQuery(meter, start, end, window, tz), psycopg_bind)
    return sum(int(row[3] or 0) for row in conn.execute(sql, params).fetchall())


def test_the_coarsest_rows_that_fit_are_read(fresh):
    """Day rows marked +1,000,000 and hour rows +1,000 show which level each query reads."""
    _send(fresh, _events(random.Random(5), 400, 10_000))
    start, end = BASE + timedelta(hours=4), BASE + timedelta(hours=52)  # 2026-10-25 and -26 (UTC)
    short_end = end - timedelta(microseconds=1)  # the second day is not whole: its hours, but the last
    with db.connect(fresh) as conn:
        true = {w: _total(conn, w, "UTC", start, end) for w in (None, "minute")}
        assert true[None] == true["minute"] > 0
        true_short = _total(conn, None, "UTC", start, short_end)

        def rows(table_time: str, lo: datetime, hi: datetime, more: str = "") -> int:
            table, time = table_time.split(".")
            sql = (
                f"SELECT count(*) FROM {table} WHERE meter_slug = 'requests' AND {time} >= %s AND {time} < %s"
            )
            return int(conn.execute(sql + more, (lo, hi)).fetchone()[0])

        days = rows("usage_day_aggregates.day", start, end)
        hours = rows("usage_hour_aggregates.hour", start, end)
        not_18 = " AND extract(hour FROM hour AT TIME ZONE 'UTC') <> 18"
        hours_not_18 = rows("usage_hour_aggregates.hour", start, end, not_18)
        first_day = rows("usage_day_aggregates.day", start, start + timedelta(days=1))
        second_day_hours = rows(
            "usage_hour_aggregates.hour", start + timedelta(days=1), end - timedelta(hours=1)
        )
        conn.execute("UPDATE usage_day_aggregates SET event_count = event_count + 1000000")
        conn.execute("UPDATE usage_hour_aggregates SET event_count = event_count + 1000")
        extra = {
            (None, "UTC"): 1_000_000 * days,
            ("day", "UTC"): 1_000_000 * days,
            ("month", "UTC"): 1_000_000 * days,
            ("hour", "UTC"): 1000 * hours,  # a day spans many hour windows
            ("day", "Europe/Berlin"): 1000 * hours,  # Berlin days are not UTC days; its hours fit
            ("hour", "Asia/Kolkata"): 0,  # UTC hours straddle Kolkata hours: minutes
            ("day", "Asia/Kolkata"): 1000 * hours_not_18,  # 18:00-19:00 UTC straddles Kolkata midnight
            ("minute", "UTC"): 0,
        }
        assert days > 0 and hours > 0
        for (window, tz), added in extra.items():
            assert _total(conn, window, tz, start, end) == true[None] + added, (window, tz)
        short = _total(conn, None, "UTC", start, short_end)
        assert short == true_short + 1_000_000 * first_day + 1000 * second_day_hours
        conn.rollback()


def test_duplicates_and_redeliveries_do_not_change_rollups(fresh):
    evs = _events(random.Random(11), 300, 200)
    _send(fresh, evs)
    with db.connect(fresh) as conn:
        before = _rollup_rows(conn)
    _send(fresh, evs)  # the same stream sequences again: redeliveries, skipped by the ledger
    _send(fresh, list(reversed(evs)), first_seq=1000, chunk=7)  # new messages, ids already stored
    with db.connect(fresh) as conn:
        assert _rollup_rows(conn) == before
        compared, differing = _mismatches(conn)
    assert compared > 0 and differing == 0


def test_a_quarantine_replay_adds_to_rollups_once(fresh):
    evs = _events(random.Random(17), 300, 250)
    _send(fresh, evs, late=timedelta(hours=1))  # received four days after BASE: all too late
    with db.connect(fresh) as conn:
        assert _rollup_rows(conn) == []
    assert replay_quarantine(fresh, CATALOG, max_lateness=timedelta(days=30)).stored == len(_stored(evs))
    with db.connect(fresh) as conn:
        after = _rollup_rows(conn)
        assert after and _mismatches(conn)[1] == 0
        meter = CATALOG.meter("amount_sum")
        assert meter is not None
        q = Q("amount_sum", "day", "Europe/Berlin", *RANGES[2], ("customer_id",), None)
        assert _answer(conn, meter, q, BASE) == reference(_stored(evs), meter, q, BASE)
    assert replay_quarantine(fresh, CATALOG, max_lateness=timedelta(days=30)).stored == 0
    with db.connect(fresh) as conn:
        assert _rollup_rows(conn) == after


def test_a_rebuild_leaves_rollups_equal_to_minutes_and_the_check_catches_a_damaged_one(fresh):
    _send(fresh, _events(random.Random(3), 300, 10_000))
    settings = quality.QualitySettings(lookback=timedelta(days=5))
    now = BASE + timedelta(days=3, hours=12)
    with db.connect(fresh, autocommit=True) as conn:
        meters = [m for m in CATALOG.meters if m.slug in ("requests", "amount_sum")]
        ok = quality.reconcile_aggregates(conn, meters, settings, now=now)
        assert ok.passed and ok.metadata["rollups_compared"] > 0, ok.description
        conn.execute(
            "UPDATE usage_hour_aggregates SET value_sum = value_sum + 1 WHERE meter_slug = 'amount_sum'"
            " AND hour = (SELECT min(hour) FROM usage_hour_aggregates WHERE meter_slug = 'amount_sum'"
            " AND value_sum IS NOT NULL)"
        )
        conn.execute(
            "DELETE FROM usage_day_aggregates WHERE meter_slug = 'requests'"
            " AND (day, customer_id, dims) = (SELECT day, customer_id, dims FROM usage_day_aggregates"
            " WHERE meter_slug = 'requests' ORDER BY 1, 2, 3::text LIMIT 1)"
        )
        bad = quality.reconcile_aggregates(conn, meters, settings, now=now)
        assert not bad.passed and bad.metadata["mismatches"] == 0 and bad.metadata["rollup_mismatches"] == 2
        levels = [(m["meter"], m["level"]) for m in bad.metadata["first_rollup_mismatches"]]
        assert levels == [("requests", "day"), ("amount_sum", "hour")]
        assert "rollups differ" in bad.description
        json.dumps(bad.metadata)  # stored as the check's metadata: plain JSON values only
        assert _mismatches(conn)[1] > 0
        for slug in ("requests", "amount_sum"):
            meter = CATALOG.meter(slug)
            replay_meter(conn, MeterChange(slug, meter, meter))
        assert _mismatches(conn)[1] == 0
        assert quality.reconcile_aggregates(conn, meters, settings, now=now).passed


def _minute_row(conn: Any, minute: str, customer: str, count: int, total: str | None) -> None:
    conn.execute(
        "INSERT INTO usage_minute_aggregates (meter_slug, minute, customer_id, dims, event_count, value_count,"
        " value_sum, value_min, value_max) VALUES ('m', %s, %s, '{}', %s, %s, %s, %s, %s)",
        (minute, customer, count, 0 if total is None else count, total, total, total),
    )


def test_the_migration_backfills_rollups_from_existing_minutes(database_url, monkeypatch):
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")  # the backfill must not depend on the session's zone
    url = db.with_database(database_url, "rollups_backfill")
    with db.connect(db.with_database(database_url, "postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS rollups_backfill")
    db.ensure_database(url)
    try:
        with db.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, name, sql in db.migrations():
                if version < 9:  # the schema as it was before the rollups
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, name))
            _minute_row(conn, "2026-10-24T23:59:00Z", "a", 2, "1.5")
            _minute_row(conn, "2026-10-25T00:00:00Z", "a", 3, "2.25")
            _minute_row(conn, "2026-10-25T00:59:00Z", "a", 1, None)
            _minute_row(conn, "2026-10-25T01:00:00Z", "b", 4, "-7")
        assert db.migrate(url) == [v for v, _, _ in db.migrations() if v >= 9]
        with db.connect(url) as conn:
            hours = conn.execute(
                "SELECT hour, customer_id, event_count, value_count, value_sum, value_min, value_max"
                " FROM usage_hour_aggregates ORDER BY 1, 2"
            ).fetchall()
            days = conn.execute(
                "SELECT day, customer_id, event_count, value_sum FROM usage_day_aggregates ORDER BY 1, 2"
            ).fetchall()
    finally:
        with db.connect(db.with_database(database_url, "postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS rollups_backfill")
    h = datetime(2026, 10, 25, tzinfo=UTC)
    assert hours == [
        (h - timedelta(hours=1), "a", 2, 2, Decimal("1.5"), Decimal("1.5"), Decimal("1.5")),
        (h, "a", 4, 3, Decimal("2.25"), Decimal("2.25"), Decimal("2.25")),
        (h + timedelta(hours=1), "b", 4, 4, Decimal("-7"), Decimal("-7"), Decimal("-7")),
    ]
    assert days == [
        (h - timedelta(days=1), "a", 2, Decimal("1.5")),
        (h, "a", 4, Decimal("2.25")),
        (h, "b", 4, Decimal("-7")),
    ]


def test_rows_of_open_periods_are_rewritten_on_their_own_page(fresh):
    """Every batch rewrites the rows of the open hour and day. Migration 0012 leaves room on their
    pages, so a new version stays on its row's page (a HOT update: no new index entry, the old version
    pruned in place) instead of moving; with full pages most rows would move on their first update."""
    meter = CATALOG.meter("amount_sum")
    assert meter is not None
    sql, params = aggregate_upsert_sql(meter, "new_events")
    customers = [f"c{i:03d}" for i in range(600)]
    rng = random.Random(5)
    with db.connect(fresh) as conn:
        fillfactors = dict(
            conn.execute(
                "SELECT relname::text, reloptions::text FROM pg_class WHERE relname = ANY(%s)",
                (["usage_minute_aggregates", *(table for table, _, _ in ROLLUPS.values())],),
            ).fetchall()
        )
        assert fillfactors == {
            "usage_minute_aggregates": "{fillfactor=90}",
            "usage_hour_aggregates": "{fillfactor=70}",
            "usage_day_aggregates": "{fillfactor=70}",
        }
        conn.execute(
            "CREATE TEMP TABLE new_events (id text, event_type text, customer_id text, ts timestamptz,"
            " properties jsonb, stream_seq bigint) ON COMMIT DELETE ROWS"
        )

        def batch(who: list[str], n: int) -> None:
            with conn.cursor().copy("COPY new_events FROM STDIN") as copy:
                for i, customer in enumerate(who):
                    props = json.dumps({"region": "eu", "amount": 1})
                    copy.write_row((f"{n}-{i}", "request", customer, BASE + timedelta(minutes=5), props, n))
            conn.execute(sql, params)
            conn.commit()

        def pages() -> dict[tuple[str, str], int]:
            return {
                (table, customer): page
                for table, _, _ in ROLLUPS.values()
                for customer, page in conn.execute(
                    f"SELECT customer_id, (ctid::text::point)[0]::int FROM {table} WHERE meter_slug = %s",
                    (meter.slug,),
                ).fetchall()
            }

        batch(customers, 0)
        first = pages()
        sent = len(customers)
        for n in range(1, 9):  # a quarter of the rows again per batch
            some = rng.sample(customers, len(customers) // 4)
            batch(some, n)
            sent += len(some)
        moved = sum(1 for key, page in pages().items() if first[key] != page)
        assert len(first) == 2 * len(customers) and moved <= len(first) // 20
        for table, _, _ in ROLLUPS.values():
            assert conn.execute(f"SELECT sum(event_count), sum(value_sum) FROM {table}").fetchone() == (
                sent,
                Decimal(sent),
            )
        assert _mismatches(conn) == (2 * len(customers), 0)
