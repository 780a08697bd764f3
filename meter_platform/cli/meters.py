"""``meter rebuild`` (alias ``meter replay``): rebuild meters' aggregates from the stored raw events."""

from __future__ import annotations

import argparse
import sys

from meter_platform.cli.common import database_url
from meter_platform.config import load_settings


def cmd_rebuild(args: argparse.Namespace) -> int:
    from meter_platform.access import audit
    from meter_platform.catalog import load_catalog
    from meter_platform.meters.aggregates import requested_changes
    from meter_platform.meters.rebuild import format_report, replay_meter
    from meter_platform.storage import db

    catalog = load_catalog(load_settings().catalog_dir)
    with db.connect(database_url(), autocommit=True) as conn:
        try:
            changes = requested_changes(catalog, conn, args.meters, rebuild=True)
        except ValueError as exc:
            print(f"meter {args.command}: {exc}", file=sys.stderr)
            return 2
        if not changes:
            print("every meter is active as meters.yaml defines it; name meters to rebuild them anyway")
            return 0
        for change in changes:
            print(f"rebuilding {change.slug} ({change.kind}) ...", flush=True)
            report = replay_meter(conn, change, progress=lambda line: print(f"  {line}", flush=True))
            print(format_report(report))
            audit.record_now(database_url(), "cli", "meter.rebuild", change.slug, {"kind": change.kind})
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser(
        "rebuild",
        aliases=["replay"],
        help="make meters.yaml's changes active, or rebuild named meters, from the stored raw events",
        description="Without arguments, replays every meter that meters.yaml added, changed or removed (what "
        "`meter up` and the Dagster sensor do). With meter slugs, rebuilds those meters' aggregates from the raw "
        "events even when unchanged (e.g. after the reconciliation check found damaged windows). Reports old "
        "against new values per customer.",
    )
    p.add_argument("meters", nargs="*", help="meter slugs to rebuild")
    p.set_defaults(func=cmd_rebuild)
