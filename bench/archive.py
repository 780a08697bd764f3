"""The raw-event archive at volume: one day of realistic events (the demo's traffic) written through
the micro-batch writer into a fresh PostgreSQL, then archived to Parquet; prints the file's size per
event, how much smaller it is than the day's partition, the time each step took, and a usage query
reading edge minutes of the archived day against the same query before archiving (same answer).

Run with ``.venv/bin/python bench/archive.py --events 200000``. It starts its own PostgreSQL in a
temporary folder and removes it afterwards; it prints numbers and fails only if an answer differs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meter_platform.archive import ArchiveSettings, archive_day, reader, store
from meter_platform.capture.envelope import (
    GatewayBatch,
    datetime_to_us,
    decode_events,
    encode_batch,
    format_timestamp,
)
from meter_platform.capture.messages import Message
from meter_platform.catalog import load_catalog
from meter_platform.cli.demo.traffic import TrafficGenerator, encode_events
from meter_platform.config import BATCH_HEADER, EXAMPLE_CATALOG_DIR, GATEWAY_SUBJECT
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.meters.rebuild import sync_meters
from meter_platform.meters.usage import UsageQuery
from meter_platform.runtime.servers import start_postgres
from meter_platform.storage import db

BATCH = 1000


def fill(url: str, day_start: datetime, events: int) -> None:
    """``events`` demo events spread over the day, stored through the real writer in batches of 1000."""
    catalog = load_catalog(EXAMPLE_CATALOG_DIR)
    generator = TrafficGenerator("bench", 7)
    writer = MicroBatchWriter(catalog, url)
    step = 86_400_000_000 // events
    received = datetime_to_us(day_start + timedelta(days=1))
    try:
        for seq, first in enumerate(range(0, events, BATCH), 1):
            batch = generator.events(first, min(BATCH, events - first), day_start)
            for i, event in enumerate(batch):
                event["timestamp"] = format_timestamp(
                    day_start + timedelta(microseconds=(first + i) * step + i % step)
                )
            decoded, errors, _ = decode_events(encode_events(batch))  # as the gateway reads a request
            assert not errors, errors[:3]
            body = encode_batch(
                GatewayBatch(received_at=received, events=[e for e in decoded if e is not None])
            )
            counts = writer.write([Message(seq, GATEWAY_SUBJECT, body, {BATCH_HEADER: "1"}, received)])
            assert counts.quarantined == 0, counts
    finally:
        writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=200_000, help="events of the archived day (default 200000)"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="meter-archive-bench-"))
    server = start_postgres(folder / "pg")
    try:
        url = server.url
        db.migrate(url)
        catalog = load_catalog(EXAMPLE_CATALOG_DIR)
        with db.connect(url, autocommit=True) as conn:
            sync_meters(conn, catalog)
        day = datetime.now(UTC).date() - timedelta(days=50)
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        t = time.monotonic()
        fill(url, start, args.events)
        print(f"stored {args.events} events of {day} through the writer in {time.monotonic() - t:.1f} s")
        meter = catalog.meter("bytes_transferred")
        assert meter is not None
        query = UsageQuery(meter, start + timedelta(hours=3, seconds=17.5), start + timedelta(hours=20, seconds=42.25),
                           "hour", "UTC", ("customer_id",))  # fmt: skip
        with db.connect(url, autocommit=True) as conn:
            size = conn.execute(
                "SELECT pg_total_relation_size(%s)", (f"usage_events_{day:%Y%m%d}",)
            ).fetchone()
            t = time.monotonic()
            hot = reader.usage_rows(conn, query)
            hot_s = time.monotonic() - t
            result = archive_day(conn, day, ArchiveSettings(hot_days=40, url=str(folder / "archive")))
            print(result.line())
            assert result.path is not None and size is not None
            info = store.file_info(result.path)
            print(
                f"file {result.bytes:,} B = {result.bytes / result.rows:.1f} B/event; the partition was "
                f"{result.table_bytes:,} B ({result.compression_ratio}x), {size[0]:,} B with its indexes "
                f"({size[0] / result.bytes:.1f}x); Parquet {info['uncompressed_bytes']:,} B before zstd "
                f"({info['uncompressed_bytes'] / result.bytes:.1f}x), {info['row_groups']} row group(s)"
            )
            t = time.monotonic()
            archived = reader.usage_rows(conn, query)
            archived_s = time.monotonic() - t
            if archived != hot:
                print("the usage answer differs after archiving")
                return 1
            print(
                f"usage with edge minutes on the day ({len(hot)} rows): {hot_s * 1000:.0f} ms from the partition, "
                f"{archived_s * 1000:.0f} ms from the file; the same answer"
            )
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
