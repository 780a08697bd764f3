"""``meter quarantine list|replay``: quarantined events, and replaying them once the catalog is fixed."""

from __future__ import annotations

import argparse
import json
import sys

from meter_platform.cli.common import auth_headers, database_url, gateway_url, print_table
from meter_platform.config import load_settings


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    import httpx

    from meter_platform.ingestion.quarantine import reason_text

    url = gateway_url(args)
    params: list[tuple[str, str]] = [("reason", r) for r in args.reason or []]
    for name, value in (
        ("event_type", args.event_type),
        ("customer_id", args.customer),
        ("status", args.status),
        ("from", args.start),
        ("to", args.end),
        ("limit", args.limit),
        ("offset", args.offset),
    ):
        if value is not None:
            params.append((name, str(value)))
    try:
        response = httpx.get(f"{url}/v1/quarantine", params=tuple(params), timeout=60, headers=auth_headers())
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {url} ({exc}); is `meter up` running?", file=sys.stderr)
        return 2
    answer = response.json()
    if response.status_code != 200:
        details = "; ".join(f"{d.get('field')}: {d.get('message')}" for d in answer.get("details", []))
        print(
            f"meter quarantine list: {answer.get('error', response.text)} {details}".rstrip(), file=sys.stderr
        )
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    header = ["id", "event_type", "customer", "quarantined_at", "reasons"]
    rows = [
        [
            r["id"] if r["id"] is not None else f"(#{r['quarantine_id']}, not an event)",
            r["event_type"] or "-",
            r["customer_id"] or "-",
            r["quarantined_at"],
            "; ".join(reason_text(reason) for reason in r["reasons"]),
        ]
        for r in answer["data"]
    ]
    if not rows:
        print("(no quarantined events match)")
        return 0
    print_table(header, rows)
    if "next_offset" in answer:
        print(f"... more: repeat with --offset {answer['next_offset']}")
    return 0


def cmd_quarantine_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from meter_platform.access import audit
    from meter_platform.catalog import load_catalog
    from meter_platform.ingestion.quarantine import QuarantineFilter, parse_reasons
    from meter_platform.ingestion.quarantine_replay import count_quarantined, replay_quarantine
    from meter_platform.ingestion.validation import validate_catalog_types

    db_url = database_url()
    catalog_dir = Path(args.catalog) if args.catalog else load_settings().catalog_dir
    catalog = load_catalog(catalog_dir)
    validate_catalog_types(catalog)
    try:
        reasons = parse_reasons(args.reason or [])
    except ValueError as exc:
        print(f"meter quarantine replay: --reason {exc}", file=sys.stderr)
        return 2
    filters = QuarantineFilter(reasons=reasons, event_type=args.event_type, customer_id=args.customer)
    total = count_quarantined(db_url, filters)
    what = "dry run: would re-validate" if args.dry_run else "re-validating"
    print(f"{what} {total:,} quarantined event(s) with the catalog in {catalog_dir}")
    with tqdm(total=total, unit="event", desc="replay", file=sys.stderr, disable=total == 0) as bar:
        summary = replay_quarantine(
            db_url,
            catalog,
            filters,
            dry_run=args.dry_run,
            chunk_size=args.chunk_size,
            on_chunk=lambda chunk: bar.update(chunk.examined),
        )
    verb = "would be" if args.dry_run else "now"
    print(f"examined {summary.examined:,}")
    print(f"  {verb} stored:       {summary.stored:,}")
    print(f"  duplicates:       {summary.duplicates:,}  (the id was stored already: counted once)")
    print(f"  still quarantined: {summary.still_quarantined:,}")
    for text, count in summary.still_reasons.most_common(args.top):
        print(f"    {count:>7,}  {text}")
    if summary.replay_id is not None:
        audit.record_now(db_url, "cli", "quarantine.replay", str(summary.replay_id),
                         {"examined": summary.examined, "stored": summary.stored})  # fmt: skip
        print(f"replay {summary.replay_id} recorded in quarantine_replays; `meter status` shows the ledger")
    elif args.dry_run:
        print("dry run: nothing was written")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("quarantine", help="list quarantined events, or replay them after fixing the catalog")
    qsub = p.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="quarantined events with their reasons (GET /v1/quarantine)")
    q.add_argument("--reason", action="append", help="only this reason (e.g. enum, type); repeatable")
    q.add_argument("--event-type", help="only this event type")
    q.add_argument("--customer", help="only this customer")
    q.add_argument(
        "--status",
        help="quarantined (default), replayed, duplicate, or all",
        choices=["quarantined", "replayed", "duplicate", "all"],
    )
    q.add_argument("--from", dest="start", help="quarantined at or after, RFC 3339")
    q.add_argument("--to", dest="end", help="quarantined before, RFC 3339")
    q.add_argument("--limit", type=int, help="rows per page (default 100, at most 1000)")
    q.add_argument("--offset", type=int, help="skip this many rows")
    q.add_argument("--json", action="store_true", help="print the JSON answer")
    q.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    q.set_defaults(func=cmd_quarantine_list)
    q = qsub.add_parser(
        "replay",
        help="re-validate quarantined events with the current catalog; store those that now pass",
        description="Re-validates quarantined events with the current catalog through the ingestion path: "
        "those that now pass are stored and aggregated once (an id stored already becomes a duplicate), "
        "the others stay quarantined with fresh reasons. Runs against the database directly "
        "(METER_DATABASE_URL, or the one `meter up` started).",
    )
    q.add_argument("--reason", action="append", help="only events with this reason; repeatable")
    q.add_argument("--event-type", help="only this event type")
    q.add_argument("--customer", help="only this customer")
    q.add_argument("--dry-run", action="store_true", help="report what would move; write nothing")
    q.add_argument("--catalog", help="catalog folder (default: METER_CATALOG_DIR or the example catalog)")
    q.add_argument("--chunk-size", type=int, default=500, help="events per transaction (default 500)")
    q.add_argument("--top", type=int, default=5, help="how many reasons to list for the rest (default 5)")
    q.set_defaults(func=cmd_quarantine_replay)
