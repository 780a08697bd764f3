"""Raw events partitioned by UTC day (migration 0010), with dedup by id exact across the partitions.

Real PostgreSQL and JetStream from the session's fixtures: events land in their day's partition, an
id sent again on another day is a duplicate, writers racing the same ids store each once, a missing
(or dropped) partition is created on demand, and the migration moves existing rows.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from meter_platform.capture.messages import EventRows, Message
from meter_platform.config import EVENTS_SUBJECT_PREFIX
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.storage import db, partitions
from meter_platform.storage.partitions import day_partition_name, ensure_day_partitions, hot_days
from tests.helpers import api_call, publish, query, run_drain, scalar

NOW = datetime.now(UTC)


def _ts(days_ago: int, hour: int = 12) -> datetime:
    """A time on the UTC day ``days_ago`` days back, never in the future (that would be quarantined)."""
    ts = (NOW - timedelta(days=days_ago)).replace(hour=hour, minute=30, second=0, microsecond=250)
    return min(ts, NOW.replace(microsecond=250) - timedelta(seconds=1))


def _text(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _drop_partitions(database_url: str, days: list[date]) -> None:
    with db.connect(database_url, autocommit=True) as conn:
        for day in days:
            conn.execute(f"DROP TABLE IF EXISTS {day_partition_name(day)}")


def _partition_of(database_url: str) -> dict[str, str]:
    return dict(query(database_url, "SELECT id, tableoid::regclass::text FROM usage_events"))


def test_partition_names_and_days():
    assert day_partition_name(date(2026, 1, 5)) == "usage_events_20260105"
    assert partitions.day_of("2026-03-01T23:59:59.999999Z") == date(2026, 3, 1)
    # Not canonical text, and datetimes in another zone: the UTC day counts.
    assert partitions.day_of("2026-03-01T23:30:00-02:00") == date(2026, 3, 2)
    eastern = datetime(2026, 3, 2, 0, 30, tzinfo=UTC).astimezone()
    assert partitions.day_of(eastern) == date(2026, 3, 2)
    assert partitions.days_of(["2026-03-01T00:00:00.000000Z", datetime(2026, 3, 3, tzinfo=UTC)]) == {
        date(2026, 3, 1),
        date(2026, 3, 3),
    }


@pytest.mark.usefixtures("clean")
def test_events_land_in_their_day_partitions(nats_server, database_url, catalog):
    days_ago = [0, 1, 3, 10, 30]
    # A day's first and last microsecond: the ranges are [00:00, next 00:00) UTC.
    edges = [
        api_call("edge-start", ts=_text(_ts(2).replace(hour=0, minute=0, second=0, microsecond=0))),
        api_call("edge-end", ts=_text(_ts(2).replace(hour=23, minute=59, second=59, microsecond=999999))),
    ]
    _drop_partitions(database_url, [_ts(n).date() for n in (3, 10, 30)])
    publish(nats_server.url, [api_call(f"day-{n}", ts=_text(_ts(n, hour=n % 24))) for n in days_ago] + edges)
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates, counts.quarantined) == (7, 7, 0, 0)
    where = _partition_of(database_url)
    for n in days_ago:
        assert where[f"day-{n}"] == day_partition_name(_ts(n).date())
    assert where["edge-start"] == where["edge-end"] == day_partition_name(_ts(2).date())
    # One row per id in event_ids, with the stored ts.
    ids = dict(query(database_url, "SELECT id, ts FROM event_ids"))
    stored = dict(query(database_url, "SELECT id, ts FROM usage_events"))
    assert ids == stored and len(ids) == 7
    with db.connect(database_url) as conn:
        assert {_ts(n).date() for n in days_ago} <= set(hot_days(conn))
    # The usage the meters count is the same: one api_call per event.
    assert (
        scalar(
            database_url,
            "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'",
        )
        == 7
    )


@pytest.mark.usefixtures("clean")
def test_same_id_on_another_day_is_a_duplicate(nats_server, database_url, catalog):
    """A primary key on (id, ts) would store this twice: event_ids keeps the id unique by itself."""
    publish(nats_server.url, [api_call("resent", ts=_text(_ts(5))), api_call("once", ts=_text(_ts(5)))])
    first = run_drain(nats_server.url, database_url, catalog)
    assert (first.stored, first.duplicates) == (2, 0)
    # The same ids again, with timestamps on other days (one of them in a partition not yet made).
    _drop_partitions(database_url, [_ts(20).date()])
    publish(nats_server.url, [api_call("resent", ts=_text(_ts(1))), api_call("once", ts=_text(_ts(20)))])
    again = run_drain(nats_server.url, database_url, catalog)
    assert (again.events, again.stored, again.duplicates, again.quarantined) == (2, 0, 2, 0)
    rows = query(database_url, "SELECT id, ts, tableoid::regclass::text FROM usage_events ORDER BY id")
    assert rows == [
        ("once", _ts(5), day_partition_name(_ts(5).date())),
        ("resent", _ts(5), day_partition_name(_ts(5).date())),
    ]
    assert scalar(database_url, "SELECT count(*) FROM event_ids") == 2
    assert (
        scalar(
            database_url,
            "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'",
        )
        == 2
    )


def _message(seq: int, events: list[dict]) -> Message:
    return Message(
        seq=seq,
        subject=f"{EVENTS_SUBJECT_PREFIX}.api_call",
        data=json.dumps(events).encode(),
        headers=None,
        timestamp_us=int(time.time() * 1_000_000),
    )


@pytest.mark.usefixtures("clean")
def test_parallel_writers_store_each_id_once(database_url, catalog):
    """Four writers, each with its own messages holding the same 600 ids over 6 days, in parallel:
    each id is stored once, the ledger balances, the aggregates count each event once."""
    events = [
        api_call(f"race-{i}", customer=f"c{i % 7}", ts=_text(_ts(i % 6, hour=i % 24))) for i in range(600)
    ]
    writers = [MicroBatchWriter(catalog, database_url) for _ in range(4)]
    results: list = [None] * len(writers)
    start = threading.Barrier(len(writers))

    def run(k: int) -> None:
        # Each writer sends the ids in another order, in messages of 50.
        mine = events[k * 150 :] + events[: k * 150] if k % 2 else list(reversed(events))
        messages = [_message(1000 * (k + 1) + j, mine[j * 50 : (j + 1) * 50]) for j in range(12)]
        start.wait()
        results[k] = writers[k].write(messages)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    assert sum(r.events for r in results) == 2400
    assert sum(r.stored for r in results) == 600
    assert sum(r.duplicates for r in results) == 1800
    assert all(r.quarantined == 0 for r in results)
    assert query(database_url, "SELECT count(*), count(DISTINCT id) FROM usage_events")[0] == (600, 600)
    assert scalar(database_url, "SELECT count(*) FROM event_ids") == 600
    assert (
        scalar(
            database_url,
            "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'",
        )
        == 600
    )
    assert scalar(database_url, "SELECT sum(stored) FROM ingest_messages") == 600


def _rows(ids: list[str], ts: datetime) -> EventRows:
    rows = EventRows()
    for event_id in ids:
        rows.ids.append(event_id)
        rows.event_types.append("api_call")
        rows.customer_ids.append("c1")
        rows.timestamps.append(ts)
        rows.received.append(ts)
        rows.properties.append({"endpoint": "/e", "method": "GET", "region": "eu", "bytes_transferred": 1})
        rows.metadata.append({})
        rows.seqs.append(1)
    return rows


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("first_commits", [True, False])
def test_second_writer_waits_on_the_id_then_sees_the_first(database_url, catalog, first_commits):
    """Writer A holds ids uncommitted; writer B, with the same ids on another day, waits on event_ids'
    key. A commits: B stores none of them. A rolls back: B stores them all. Never both, never neither."""
    a, b = MicroBatchWriter(catalog, database_url), MicroBatchWriter(catalog, database_url)
    ids = [f"held-{i}" for i in range(20)]
    b_rows = _rows(ids, _ts(2))
    a.ensure_partitions([_ts(1)])
    b.ensure_partitions([_ts(2)])
    a_inserted = threading.Event()
    b_result: dict = {}

    def writer_b() -> None:
        a_inserted.wait()
        began = time.monotonic()
        conn = b.connection()
        with conn.transaction():
            b_result["stored"] = b.insert_raw(conn.cursor(), b_rows)
        b_result["waited"] = time.monotonic() - began

    thread = threading.Thread(target=writer_b)
    thread.start()
    conn = a.connection()
    try:
        with conn.transaction():
            a_stored = a.insert_raw(conn.cursor(), _rows(ids, _ts(1)))
            a_inserted.set()
            time.sleep(0.5)  # B is now waiting on the keys A holds
            if not first_commits:
                raise psycopg.Rollback()
    finally:
        thread.join()
        a.close()
        b.close()
    assert a_stored == {1: 20}
    assert b_result["waited"] >= 0.4
    assert b_result["stored"] == ({} if first_commits else {1: 20})
    day = (_ts(1) if first_commits else _ts(2)).date()
    assert query(database_url, "SELECT count(*), min(tableoid::regclass::text) FROM usage_events") == [
        (20, day_partition_name(day))
    ]
    assert scalar(database_url, "SELECT count(*) FROM event_ids") == 20


@pytest.mark.usefixtures("clean")
def test_missing_and_dropped_partitions_are_created(nats_server, database_url, catalog):
    gone = _ts(8).date()
    publish(nats_server.url, api_call("before-drop", ts=_text(_ts(8))))
    assert run_drain(nats_server.url, database_url, catalog).stored == 1
    # The partition is dropped behind this process's back (as archiving does): the writer remembers
    # it, its insert finds no partition, it looks again, creates the day and stores the event.
    _drop_partitions(database_url, [gone])
    publish(nats_server.url, api_call("after-drop", ts=_text(_ts(8))))
    assert run_drain(nats_server.url, database_url, catalog).stored == 1
    assert _partition_of(database_url) == {"after-drop": day_partition_name(gone)}


def test_concurrent_creators_do_not_fail(database_url):
    days = [date(2001, 2, d) for d in range(1, 8)]
    _drop_partitions(database_url, days)
    created: list[list[date]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def create() -> None:
        try:
            with db.connect(database_url) as conn:
                start.wait()
                partitions.forget_partitions(conn)
                created.append(ensure_day_partitions(conn, days))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert sorted(d for c in created for d in c) == days  # each day created by exactly one of them
        with db.connect(database_url) as conn:
            assert set(days) <= set(hot_days(conn))
            bounds = conn.execute(
                "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = %s",
                (day_partition_name(days[0]),),
            ).fetchone()
        assert bounds == ("FOR VALUES FROM ('2001-02-01 00:00:00+00') TO ('2001-02-02 00:00:00+00')",)
    finally:
        _drop_partitions(database_url, days)
        partitions.forget_partitions()


def test_ensure_refuses_inside_a_transaction(database_url):
    with db.connect(database_url) as conn:
        conn.execute("SELECT 1")  # psycopg opened a transaction
        with pytest.raises(RuntimeError, match="outside a transaction"):
            ensure_day_partitions(conn, [date(2001, 3, 1)])


def _fresh_database(pg_url: str, name: str) -> str:
    url = db.with_database(pg_url, name)
    with psycopg.connect(db.with_database(pg_url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return url


def _migrate_up_to(url: str, last: int) -> None:
    with db.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, name, sql in db.migrations():
            if version <= last:
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )


def _is_partitioned(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'usage_events'::regclass"
    ).fetchone()
    return row is not None and row[0] == 1


def test_migration_on_an_empty_database(pg_server):
    url = _fresh_database(pg_server.url, "migrate_empty")
    try:
        assert db.migrate(url)[-1] >= 10
        with db.connect(url) as conn:
            assert _is_partitioned(conn)
            today = datetime.now(UTC).date()
            assert {today, today + timedelta(days=1)} <= set(hot_days(conn))
            assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM event_ids").fetchone() == (0,)
            indexes = {
                r[0]
                for r in conn.execute(
                    "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'usage_events'::regclass"
                )
            }
            assert indexes == {
                "CREATE INDEX usage_events_id ON ONLY public.usage_events USING btree (id)",
                "CREATE INDEX usage_events_type_ts ON ONLY public.usage_events USING btree (event_type, ts)",
                "CREATE INDEX usage_events_customer_ts ON ONLY public.usage_events USING btree (customer_id, ts)",
            }
    finally:
        with psycopg.connect(db.with_database(pg_server.url, "postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS migrate_empty WITH (FORCE)")


def test_migration_moves_existing_rows(pg_server):
    url = _fresh_database(pg_server.url, "migrate_rows")
    try:
        _migrate_up_to(url, 9)
        old = [
            (
                f"old-{i}",
                "api_call",
                f"c{i % 3}",
                datetime(2026, 1, 1 + i % 5, i % 24, 7, 1, 123456, tzinfo=UTC),
                datetime(2026, 1, 6, tzinfo=UTC),
                json.dumps({"n": i}),
                json.dumps({"m": i}),
                100 + i,
            )
            for i in range(50)
        ]
        with db.connect(url) as conn:
            conn.cursor().executemany(
                "INSERT INTO usage_events (id, event_type, customer_id, ts, received_at, properties, metadata,"
                " stream_seq) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                old,
            )
            conn.commit()
            before = conn.execute("SELECT * FROM usage_events ORDER BY id").fetchall()
        assert db.migrate(url)[0] == 10
        with db.connect(url) as conn:
            assert _is_partitioned(conn)
            after = conn.execute("SELECT * FROM usage_events ORDER BY id").fetchall()
            assert after == before  # every column, stored_at included
            assert conn.execute("SELECT id, ts FROM event_ids ORDER BY id").fetchall() == [
                (r[0], r[3]) for r in before
            ]
            placed = conn.execute("SELECT id, ts, tableoid::regclass::text FROM usage_events").fetchall()
            assert all(part == day_partition_name(ts.astimezone(UTC).date()) for _, ts, part in placed)
            assert {date(2026, 1, d) for d in range(1, 6)} <= set(hot_days(conn))
            assert conn.execute("SELECT to_regclass('usage_events_unpartitioned')").fetchone() == (None,)
    finally:
        with psycopg.connect(db.with_database(pg_server.url, "postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS migrate_rows WITH (FORCE)")
