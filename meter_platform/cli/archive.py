"""``meter archive``: archive the raw events of days older than METER_HOT_DAYS now, list them, or apply
retention. Runs against the database directly (METER_DATABASE_URL, or the one `meter up` started)."""

from __future__ import annotations

import argparse
from datetime import date
from typing import Any

from meter_platform.cli.common import database_url, print_table


def _dry_run(conn: Any, settings: Any, days: list[date], retention: bool) -> int:
    """List the eligible days with their events (and what retention would delete); change nothing."""
    from meter_platform.archive import expired_parts

    rows = conn.execute(
        "SELECT (ts AT TIME ZONE 'UTC')::date AS day, count(*) FROM usage_events WHERE ts < %s GROUP BY 1",
        (settings.cutoff(),),
    ).fetchall()
    counts: dict[Any, int] = dict(rows)
    print_table(["day", "events"], [[str(d), str(counts.get(d, 0))] for d in days])
    if not days:
        print("(no day to archive)")
    if retention:
        expired = expired_parts(conn, settings)
        print(f"retention would delete {len(expired)} file(s)")
        print_table(
            ["day", "part", "rows", "path"], [[str(p.day), str(p.part), str(p.rows), p.path] for p in expired]
        )
    return 0


def _retention(conn: Any, settings: Any) -> None:
    from meter_platform.archive import apply_retention

    if settings.retention_days is None:
        print("retention: METER_RETENTION_DAYS is not set; archive files are kept forever")
        return
    deleted = apply_retention(conn, settings, actor="cli")
    for part in deleted:
        print(f"{part.day}: part {part.part} deleted ({part.rows} events): {part.path}")
    print(f"retention: {len(deleted)} file(s) older than {settings.retention_days} days deleted")


def cmd_archive(args: argparse.Namespace) -> int:
    from meter_platform.access import audit
    from meter_platform.archive import archive_eligible, eligible_days, load_archive_settings, summary
    from meter_platform.storage import db

    settings = load_archive_settings()
    url = database_url()
    failed = 0
    with db.connect(url, autocommit=True) as conn:
        days = eligible_days(conn, settings)
        print(
            f"archive: {settings.url}; days before {settings.cutoff()} are archived (METER_HOT_DAYS={settings.hot_days})"
        )
        if args.dry_run:
            return _dry_run(conn, settings, days, args.retention)
        if days:
            totals = summary(archive_eligible(conn, settings, print))
            failed = len(totals["failed"])
            print(
                f"{totals['days_archived']} day(s) archived: {totals['events']} events, {totals['bytes']:,} bytes"
                + (f"; {failed} failed verification and stay in PostgreSQL: {', '.join(totals['failed'])}" if failed else "")
            )  # fmt: skip
            if totals["days_archived"]:
                audit.record_now(url, "cli", "archive.run", None, totals)
        else:
            print("no day to archive")
        if args.retention:
            _retention(conn, settings)
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser(
        "archive",
        help="archive raw events of days older than METER_HOT_DAYS to Parquet, then drop them from PostgreSQL",
        description="Writes each eligible day's raw events to a zstd Parquet file under METER_ARCHIVE_URL, "
        "verifies it (rows, checksum, the ledger, every meter's totals), and only then drops the day's "
        "partition. Usage queries, rebuilds and event lookups read archived days from the files.",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list the days that would be archived; change nothing"
    )
    p.add_argument(
        "--retention", action="store_true", help="also delete archive files older than METER_RETENTION_DAYS"
    )
    p.set_defaults(func=cmd_archive)
