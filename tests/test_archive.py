"""Archiving raw events to Parquet: a day older than METER_HOT_DAYS is written to a zstd file,
verified and dropped from PostgreSQL, and every reader of raw events gives the same answers after as
before (usage by day and customer for sum, count, unique_count and latest meters over a range ending
mid-minute, a meter rebuild, the event lookup, an invoice). Real PostgreSQL, real files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from meter_platform.access.audit import list_audit
from meter_platform.archive import (
    ArchiveMismatch,
    ArchiveSettings,
    apply_retention,
    archive_day,
    archive_eligible,
    eligible_days,
    reader,
    store,
)
from meter_platform.capture.envelope import (
    Event,
    GatewayBatch,
    datetime_to_us,
    encode_batch,
    format_timestamp,
)
from meter_platform.capture.messages import Message
from meter_platform.catalog import load_catalog
from meter_platform.config import BATCH_HEADER, GATEWAY_SUBJECT
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.meters.aggregates import requested_changes
from meter_platform.meters.rebuild import replay_meter, sync_meters
from meter_platform.meters.usage import UsageQuery
from meter_platform.storage import db
from meter_platform.storage.partitions import day_partition_name, hot_days
from tests.billing.support import AFTER_GRACE, MARCH, billing_catalog, invoices, march, old_events_allowed
from tests.conftest import TABLES
from tests.helpers import AUTH, serve

__all__ = ["billing_catalog", "march", "old_events_allowed"]  # fixtures of the billing tests

CATALOG = load_catalog(Path(__file__).parent / "catalogs" / "all_aggregations")
TODAY = datetime.now(UTC).date()
DAY = TODAY - timedelta(days=60)  # archived
NEXT = DAY + timedelta(days=1)  # stays hot in these tests unless archived explicitly
SEQ = iter(range(1, 1_000_000))


def at(day: date, h: int = 0, m: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, h, m, s, us, tzinfo=UTC)


def ev(id_: str, customer: str, ts: datetime, **props: Any) -> Event:
    return Event(
        event_type="request", customer_id=customer, id=id_, timestamp=format_timestamp(ts), properties=props
    )


def write(database_url: str, events: list[Event]) -> None:
    """Store events through the real micro-batch writer (received a day after the latest of them)."""
    received = datetime_to_us(max(datetime.fromisoformat(e.timestamp) for e in events) + timedelta(days=1))
    batch = GatewayBatch(received_at=received, events=events)
    writer = MicroBatchWriter(CATALOG, database_url)
    try:
        counts = writer.write(
            [Message(next(SEQ), GATEWAY_SUBJECT, encode_batch(batch), {BATCH_HEADER: "1"}, received)]
        )
    finally:
        writer.close()
    assert counts.quarantined == 0


def events() -> list[Event]:
    """Two customers on DAY (some in the range's edge minutes) and on NEXT."""
    out = []
    for i in range(300):
        ts = at(DAY, 0, 0, 10) + timedelta(seconds=287 * i, microseconds=i)
        out.append(
            ev(f"d{i}", f"c{i % 2}", ts, region=["eu", "us", "ap"][i % 3], tier=["free", "pro"][i % 2],
               amount=i % 7 + 0.25 * (i % 4), user=f"u{i % 11}", usage={"tokens": i})
        )  # fmt: skip
    # The start edge minute [00:00:30.5, 00:01) and the end edge minute of a range ending mid-minute.
    out.append(ev("edge-start", "c0", at(DAY, 0, 0, 45), region="eu", amount=1000, user="edge"))
    out.append(ev("edge-end", "c1", at(DAY, 23, 59, 20), region="us", tier="pro", amount=7, user="late"))
    out.append(ev("after-end", "c1", at(DAY, 23, 59, 59, 900_000), region="us", amount=3, user="after"))
    out.append(ev("tricky", "c0", at(DAY, 12, 0, 0, 7), region="eu", note='a,"b"\nc \\ ü €', n=1.0e-7))
    for i in range(50):
        ts = at(NEXT, 1) + timedelta(minutes=13 * i, microseconds=7)
        out.append(ev(f"n{i}", f"c{i % 2}", ts, region="eu", tier="free", amount=i, user=f"u{i % 5}"))
    return out


RANGES = [
    (at(DAY, 0, 0, 30, 500_000), at(DAY, 23, 59, 59, 500_000)),  # DAY, both edges mid-minute
    (at(DAY, 6, 0, 0, 1), at(NEXT, 12, 0, 0, 250_000)),  # across the archived and the hot day
    (at(DAY), at(NEXT + timedelta(days=1))),  # whole days
]
SLUGS = ["amount_sum", "requests", "unique_users", "latest_amount", "amount_min", "pro_tokens"]


def usage(conn, slug: str, start: datetime, end: datetime, window: str | None, customer: str | None = None):
    meter = CATALOG.meter(slug)
    assert meter is not None
    q = UsageQuery(meter, start, end, window, "UTC", ("customer_id",), customer)
    return reader.usage_rows(conn, q)


def answers(database_url: str) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    with db.connect(database_url, autocommit=True) as conn:
        for slug in SLUGS:
            for start, end in RANGES:
                for window in (None, "day", "hour"):
                    out[(slug, start, end, window)] = usage(conn, slug, start, end, window)
                out[(slug, start, end, "c1")] = usage(conn, slug, start, end, "day", "c1")
    return out


@pytest.fixture(autouse=True)
def no_archive_left(database_url: str) -> Iterator[None]:
    """Other modules' tests truncate the tables they use, not the archive's: leave no archived day."""
    yield
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE archived_days CASCADE")


@pytest.fixture
def archive_db(database_url: str, clean, tmp_path: Path) -> ArchiveSettings:
    """Empty tables with the test catalog's meters, and an archive folder of its own."""
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)}, event_ids, archived_days RESTART IDENTITY CASCADE")
        sync_meters(conn, CATALOG)
    return ArchiveSettings(hot_days=40, url=str(tmp_path / "archive"))


def archive(database_url: str, settings: ArchiveSettings, day: date = DAY, **kwargs: Any):
    with db.connect(database_url, autocommit=True) as conn:
        return archive_day(conn, day, settings, **kwargs)


def test_answers_are_the_same_after_archiving_the_day(database_url, archive_db):
    write(database_url, events())
    before = answers(database_url)
    # Edge minutes and unique counts really do read the archived day (not only the aggregates).
    assert usage(db.connect(database_url), "amount_sum", *RANGES[0], None, "c0")[0][3] > 1000
    with db.connect(database_url, autocommit=True) as conn:
        lookups = {
            i: conn.execute("SELECT * FROM usage_events WHERE id = %s", (i,)).fetchone()
            for i in ("edge-end", "tricky")
        }
        assert DAY in eligible_days(conn, archive_db) and NEXT in eligible_days(conn, archive_db)
        assert TODAY - timedelta(days=39) not in eligible_days(conn, archive_db, today=TODAY)

    result = archive(database_url, archive_db)

    assert result.status == "archived" and result.part == 1 and result.rows == 304
    path = Path(store.part_path(archive_db.url, DAY, 1))
    assert result.path == str(path) and path.exists() and path.stat().st_size == result.bytes
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 304 and meta.row_group(0).column(0).compression == "ZSTD"
    assert result.compression_ratio and result.compression_ratio > 1
    assert (
        result.verification
        and result.verification.ok
        and result.verification.meters_checked == len(CATALOG.meters)
    )
    assert sum(store.id_hash(i) for i in pq.read_table(path, columns=["id"])["id"].to_pylist()) == int(
        result.checksum
    )
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY not in hot_days(conn) and NEXT in hot_days(conn)
        assert conn.execute("SELECT to_regclass(%s)", (day_partition_name(DAY),)).fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM usage_events WHERE ts < %s", (at(NEXT),)).fetchone() == (0,)
        assert conn.execute("SELECT day, part, rows FROM archived_days").fetchall() == [(DAY, 1, 304)]
        assert conn.execute("SELECT count(*) FROM event_ids").fetchone() == (354,)  # dedup keeps every id

    assert answers(database_url) == before
    with db.connect(database_url, autocommit=True) as conn:
        for event_id, stored in lookups.items():  # every column as PostgreSQL had it
            row = reader.find_event(conn, event_id)
            assert row is not None and tuple(row.values()) == tuple(stored)
        assert reader.find_event(conn, "n1") is None  # hot: the caller reads usage_events
        assert reader.find_event(conn, "never-sent") is None
    # A resend of an archived event is a duplicate: nothing changes.
    write(database_url, [ev("d5", "c1", at(DAY, 9), amount=99)])
    assert answers(database_url) == before


MINUTES = (
    "SELECT meter_slug, minute, customer_id, dims, event_count, value_count, value_sum, value_min, value_max"
    " FROM usage_minute_aggregates ORDER BY meter_slug, minute, customer_id, dims::text"
)


def test_a_rebuild_reads_the_archived_days(database_url, archive_db):
    write(database_url, events())
    with db.connect(database_url, autocommit=True) as conn:
        aggregates = conn.execute(MINUTES).fetchall()
    archive(database_url, archive_db)
    with db.connect(database_url, autocommit=True) as conn:
        for slug in ("amount_sum", "unique_users", "latest_amount"):
            (change,) = requested_changes(CATALOG, conn, [slug], rebuild=True)
            report = replay_meter(conn, change)
            assert report.customers and not report.changed_customers, slug
            assert report.events == (354 if slug == "amount_sum" else report.events)
        after = conn.execute(MINUTES).fetchall()
    assert after == aggregates


def test_a_file_that_does_not_match_leaves_the_partition(database_url, archive_db):
    write(database_url, events())

    def corrupt(line: str) -> None:  # between writing and verifying, one id of the file changes
        if "verifying" in line:
            path = store.part_path(archive_db.url, DAY, 1)
            table = pq.read_table(path)
            ids = table["id"].to_pylist()
            ids[0] = ids[0] + "x"
            import pyarrow as pa

            table = table.set_column(0, table.schema.field("id"), pa.array(ids))
            pq.write_table(table, path, compression="zstd")

    with pytest.raises(ArchiveMismatch, match="checksum"):
        archive(database_url, archive_db, progress=corrupt)
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY in hot_days(conn)
        assert conn.execute("SELECT count(*) FROM archived_days").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM usage_events WHERE ts < %s", (at(NEXT),)).fetchone() == (
            304,
        )
    assert not Path(store.part_path(archive_db.url, DAY, 1)).exists()

    # Aggregates that disagree with the raw events: refused too.
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE usage_day_aggregates SET value_sum = value_sum + 1 WHERE meter_slug = 'amount_sum'"
            " AND day = %s AND customer_id = 'c0' AND dims = '{\"region\": \"eu\"}'",
            (at(DAY),),
        )
    with pytest.raises(ArchiveMismatch, match="amount_sum"):
        archive(database_url, archive_db)
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY in hot_days(conn)


def test_a_day_not_old_enough_is_not_archived(database_url, archive_db):
    recent = TODAY - timedelta(days=2)
    write(database_url, [ev("r1", "c0", at(recent, 5), amount=1)])
    result = archive(database_url, archive_db, day=recent)
    assert result.status == "not_eligible"
    with db.connect(database_url, autocommit=True) as conn:
        assert recent in hot_days(conn)


def test_retention_deletes_old_files_and_audits(database_url, archive_db):
    write(database_url, events())
    result = archive(database_url, archive_db)
    settings = replace(archive_db, retention_days=59)
    with db.connect(database_url, autocommit=True) as conn:
        assert apply_retention(conn, replace(archive_db, retention_days=61)) == []  # not old enough yet
        deleted = apply_retention(conn, settings, actor="tests")
        assert [(d.day, d.part, d.rows) for d in deleted] == [(DAY, 1, 304)]
        assert not Path(result.path or "").exists()
        assert conn.execute("SELECT deleted_at IS NOT NULL FROM archived_days").fetchone() == (True,)
        entry = list_audit(conn)[0]
        assert (entry["actor"], entry["action"], entry["details"]["rows"]) == ("tests", "archive.delete", 304)
        assert apply_retention(conn, settings) == []  # done once
        # Sums still come from the aggregates; the raw events of the day are gone.
        assert sum(r[3] for r in usage(conn, "requests", at(DAY), at(NEXT), None)) == 304
        assert reader.find_event(conn, "edge-end") is None


def test_events_stored_after_archiving_make_a_second_part(database_url, archive_db):
    write(database_url, events())
    archive(database_url, archive_db)
    # A late event for the archived day (e.g. a quarantine replay): its partition comes back.
    write(database_url, [ev("late-1", "c0", at(DAY, 0, 0, 50), region="eu", amount=5, user="newcomer")])
    before = answers(database_url)
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY in hot_days(conn)
        assert sum(r[3] for r in usage(conn, "requests", at(DAY), at(NEXT), None)) == 305
    result = archive(database_url, archive_db)
    assert (result.status, result.part, result.rows) == ("archived", 2, 1)
    assert result.verification is not None and result.verification.ledger_rows == 305
    assert answers(database_url) == before
    with db.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT part, rows FROM archived_days ORDER BY part").fetchall() == [
            (1, 304),
            (2, 1),
        ]
        found = reader.find_event(conn, "late-1")
        assert found is not None and found["properties"] == {"region": "eu", "amount": 5, "user": "newcomer"}
        assert reader.find_event(conn, "d0") is not None


def test_archive_eligible_archives_every_old_day(database_url, archive_db):
    write(database_url, events())
    lines: list[str] = []
    with db.connect(database_url, autocommit=True) as conn:
        results = archive_eligible(conn, archive_db, lines.append)
        assert {r.day for r in results if r.status == "archived"} >= {DAY, NEXT}
        assert not [d for d in hot_days(conn) if d < archive_db.cutoff()]
    assert any(line.startswith(f"{DAY}: archived part 1: 304 events") for line in lines)


def test_the_dagster_asset_archives_its_day_and_checks_it(database_url, archive_db, monkeypatch):
    from dagster import DagsterInstance, build_schedule_context, materialize

    from meter_platform.defs.archive.assets import usage_events_archive
    from meter_platform.defs.archive.jobs import archive_schedule
    from meter_platform.defs.resources import PostgresResource

    monkeypatch.setenv("METER_ARCHIVE_URL", archive_db.url)
    write(database_url, events())
    postgres = PostgresResource(url=database_url)
    with DagsterInstance.ephemeral() as instance:
        requests = archive_schedule(
            build_schedule_context(instance=instance, scheduled_execution_time=datetime.now(UTC)),
            postgres=postgres,
        )
        assert {DAY.isoformat(), NEXT.isoformat()} <= {r.partition_key for r in requests}
        result = materialize([usage_events_archive], partition_key=DAY.isoformat(), resources={"postgres": postgres},
                             instance=instance)  # fmt: skip
        assert result.success
        (mat,) = result.asset_materializations_for_node("usage_events_archive")
        assert mat.metadata["rows"].value == 304 and mat.metadata["compression_ratio"].value > 1
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks == {"archive_matches_postgres": True, "archive_files_readable": True}
        # A day still hot is not archived, and the run says so without materializing anything.
        recent = TODAY - timedelta(days=3)
        result = materialize([usage_events_archive], partition_key=recent.isoformat(),
                             resources={"postgres": postgres}, instance=instance)  # fmt: skip
        assert result.success and not result.asset_materializations_for_node("usage_events_archive")
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY not in hot_days(conn)


def test_the_gateway_answers_the_same_after_archiving(database_url, archive_db, settings):
    import httpx

    from ingest_gateway.app import create_app

    write(database_url, events())
    queries = [
        (
            slug,
            {"from": format_timestamp(s), "to": format_timestamp(e), "window": w, "group_by": "customer_id"},
        )
        for slug in ("amount_sum", "requests", "unique_users", "latest_amount")
        for s, e in RANGES[:2]
        for w in ("day", "hour")
    ]

    def read(url: str) -> tuple[list[Any], Any]:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
            answers = []
            for slug, params in queries:
                r = client.get(f"/v1/meters/{slug}/usage", params=params)
                assert r.status_code == 200, r.text
                answers.append(r.json())
            found = client.get("/v1/events/edge-end")
            assert found.status_code == 200, found.text
            return answers, found.json()

    with serve(create_app(settings, CATALOG)) as url:
        before = read(url)
        archive(database_url, archive_db)
        after = read(url)
    assert after == before and before[1]["state"] == "stored" and before[1]["customer_id"] == "c1"
    assert any(a["data"] and a["data"][0]["value"] for a in before[0])


def _invoice_lines(database_url: str, period: str = MARCH) -> dict[str, Any]:
    return {
        c: (
            i["total"],
            [(ln["type"], ln["meter"], ln["group"], ln["quantity"], ln["amount"]) for ln in i["lines"]],
        )
        for c, i in invoices(database_url, period).items()
    }


def test_an_invoice_is_the_same_after_archiving_its_month(march, nats_server, database_url, tmp_path):
    from meter_platform.billing import invoicing
    from tests.billing.support import send, ts
    from tests.helpers import api_call

    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE archived_days CASCADE")
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    before = _invoice_lines(database_url)
    settings = ArchiveSettings(hot_days=40, url=str(tmp_path / "archive"))
    with db.connect(database_url, autocommit=True) as conn:
        results = archive_eligible(conn, settings)
        march_days = {r.day for r in results if r.status == "archived" and r.rows}
        assert {date(2026, 3, d) for d in (2, 3, 4, 10, 13, 14, 20, 21, 22, 23)} <= march_days
        assert conn.execute("SELECT count(*) FROM usage_events WHERE ts < '2026-04-01'").fetchone() == (0,)
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    assert _invoice_lines(database_url) == before and before["a"][0] == "20.94"
    # A late event after March was finalized is an adjustment on April's draft, also once its day is
    # archived (billing finds late usage of archived days in archived_customer_days).
    invoicing.bill_period(database_url, march, MARCH, finalize=True, now=AFTER_GRACE)
    send(nats_server, database_url, march, [api_call("a-late", "a", ts=ts(30))])
    april_now = datetime(2026, 4, 20, tzinfo=UTC)
    invoicing.bill_period(database_url, march, "2026-04", now=april_now)
    april = _invoice_lines(database_url, "2026-04")
    assert [line[1] for line in april["a"][1] if line[0] == "adjustment"] == [
        "api_calls",
        "bytes_transferred",
    ]
    with db.connect(database_url, autocommit=True) as conn:
        assert [r.day for r in archive_eligible(conn, settings) if r.rows] == [date(2026, 3, 30)]
    invoicing.bill_period(database_url, march, "2026-04", now=april_now)
    assert _invoice_lines(database_url, "2026-04") == april


def test_meter_archive_lists_then_archives(database_url, archive_db, monkeypatch, capsys):
    from meter_platform.cli import main

    monkeypatch.setenv("METER_DATABASE_URL", database_url)
    monkeypatch.setenv("METER_ARCHIVE_URL", archive_db.url)
    write(database_url, events())
    assert main(["archive", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{DAY}  304" in out and f"{NEXT}  50" in out
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY in hot_days(conn)
    assert main(["archive"]) == 0
    out = capsys.readouterr().out
    assert f"{DAY}: archived part 1: 304 events" in out and "events written" in out
    with db.connect(database_url, autocommit=True) as conn:
        assert DAY not in hot_days(conn) and NEXT not in hot_days(conn)


def test_an_fsspec_url_holds_the_archive(database_url, archive_db):
    """Any fsspec filesystem works as METER_ARCHIVE_URL (s3:// with s3fs installed); here memory://."""
    import fsspec

    write(database_url, events())
    before = answers(database_url)
    settings = replace(archive_db, url="memory://meter-archive")
    result = archive(database_url, settings)
    assert result.path == f"memory://meter-archive/usage_events/day={DAY}/part-1.parquet"
    fs = fsspec.filesystem("memory")
    assert fs.size(result.path) == result.bytes and not fs.glob("/meter-archive/**/*.tmp-*")
    assert answers(database_url) == before
    fs.rm("/meter-archive", recursive=True)
