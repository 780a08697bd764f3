"""The ``meter`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from meter_platform.config import load_settings


def _gateway_url(args: argparse.Namespace) -> str:
    if getattr(args, "gateway", None):
        return args.gateway.rstrip("/")
    from meter_platform.runtime.up import read_runtime

    runtime = read_runtime()
    if runtime.get("gateway_url"):
        return runtime["gateway_url"]
    settings = load_settings()
    return f"http://{settings.gateway_host}:{settings.gateway_port}"


def cmd_up(args: argparse.Namespace) -> int:
    from meter_platform.runtime.up import up

    return up()


def cmd_migrate(args: argparse.Namespace) -> int:
    from meter_platform.config import require_url
    from meter_platform.storage import db

    url = require_url(load_settings().database_url, "METER_DATABASE_URL")
    applied = db.migrate(url)
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url = _gateway_url(args)
    try:
        answer = httpx.get(f"{url}/v1/ingest/status", timeout=10).json()
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {url} ({exc}); is `meter up` running?", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    ev, st, co = answer["events"], answer["stream"], answer["consumer"]
    print(f"stream {st['name']}: last seq {st['last_seq']:,}, {st['messages']:,} messages waiting")
    print(f"consumer: {co['pending']:,} pending, ack floor {co['ack_floor']:,}")
    print(
        f"events processed {ev['processed']:,} = stored {ev['stored']:,} + duplicates {ev['duplicates']:,}"
        f" + quarantined {ev['quarantined']:,}  ({'balanced' if ev['balanced'] else 'NOT BALANCED'})"
    )
    if ev.get("replayed_from_quarantine") or ev.get("duplicates_from_quarantine"):
        print(
            f"moved out of quarantine by replays: {ev.get('replayed_from_quarantine', 0):,} stored,"
            f" {ev.get('duplicates_from_quarantine', 0):,} duplicates"
        )
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    import httpx

    url = _gateway_url(args)
    params = {
        k: v
        for k, v in {
            "from": args.start,
            "to": args.end,
            "window": args.window,
            "group_by": args.group_by,
            "customer_id": args.customer,
            "tz": args.tz,
            "offset": args.offset,
        }.items()
        if v
    }
    try:
        response = httpx.get(f"{url}/v1/meters/{args.meter}/usage", params=params, timeout=60)
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {url} ({exc}); is `meter up` running?", file=sys.stderr)
        return 2
    answer = response.json()
    if response.status_code != 200:
        print(f"meter usage: {answer.get('error', response.text)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    dims = sorted({k for row in answer["data"] for k in row["group"]})
    header = ["window_start", "window_end", "customer_id", *dims, "value"]
    rows = [
        [
            r["window_start"],
            r["window_end"],
            r["customer_id"] or "(all)",
            *(str(r["group"].get(d)) for d in dims),
            str(r["value"]),
        ]
        for r in answer["data"]
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    print(
        f"{answer['meter']}: [{answer['from']}, {answer['to']}) window={answer['window'] or 'none'} tz={answer['tz']}"
    )
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)))
    if not rows:
        print("(no usage in this range)")
    if "next_offset" in answer:
        print(f"... more rows: repeat with --offset {answer['next_offset']}")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    import httpx

    from meter_platform.ingestion.quarantine import reason_text

    url = _gateway_url(args)
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
        response = httpx.get(f"{url}/v1/quarantine", params=tuple(params), timeout=60)
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
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())
    if "next_offset" in answer:
        print(f"... more: repeat with --offset {answer['next_offset']}")
    return 0


def _database_url() -> str:
    """METER_DATABASE_URL, or the database of the running `meter up`."""
    from meter_platform.runtime.up import read_runtime

    url = load_settings().database_url or read_runtime().get("database_url")
    if not url:
        raise RuntimeError(
            "METER_DATABASE_URL is not set and no `meter up` is running here (.meter/runtime.json); "
            "start the platform or export METER_DATABASE_URL"
        )
    return url


def cmd_replay(args: argparse.Namespace) -> int:
    from meter_platform.catalog import load_catalog
    from meter_platform.meters.aggregates import requested_changes
    from meter_platform.meters.rebuild import format_report, replay_meter
    from meter_platform.storage import db

    catalog = load_catalog(load_settings().catalog_dir)
    with db.connect(_database_url(), autocommit=True) as conn:
        try:
            changes = requested_changes(catalog, conn, args.meters, rebuild=True)
        except ValueError as exc:
            print(f"meter replay: {exc}", file=sys.stderr)
            return 2
        if not changes:
            print("every meter is active as meters.yaml defines it; name meters to rebuild them anyway")
            return 0
        for change in changes:
            print(f"replaying {change.slug} ({change.kind}) ...", flush=True)
            report = replay_meter(conn, change, progress=lambda line: print(f"  {line}", flush=True))
            print(format_report(report))
    return 0


def cmd_quarantine_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from meter_platform.catalog import load_catalog
    from meter_platform.ingestion.quarantine import QuarantineFilter, parse_reasons
    from meter_platform.ingestion.quarantine_replay import count_quarantined, replay_quarantine
    from meter_platform.ingestion.validation import validate_catalog_types

    database_url = _database_url()
    catalog_dir = Path(args.catalog) if args.catalog else load_settings().catalog_dir
    catalog = load_catalog(catalog_dir)
    validate_catalog_types(catalog)
    try:
        reasons = parse_reasons(args.reason or [])
    except ValueError as exc:
        print(f"meter quarantine replay: --reason {exc}", file=sys.stderr)
        return 2
    filters = QuarantineFilter(reasons=reasons, event_type=args.event_type, customer_id=args.customer)
    total = count_quarantined(database_url, filters)
    what = "dry run: would re-validate" if args.dry_run else "re-validating"
    print(f"{what} {total:,} quarantined event(s) with the catalog in {catalog_dir}")
    with tqdm(total=total, unit="event", desc="replay", file=sys.stderr, disable=total == 0) as bar:
        summary = replay_quarantine(
            database_url,
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
        print(f"replay {summary.replay_id} recorded in quarantine_replays; `meter status` shows the ledger")
    elif args.dry_run:
        print("dry run: nothing was written")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meter_platform.cli.demo import run

    return run(args, _gateway_url(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``meter``."""
    parser = argparse.ArgumentParser(
        prog="meter",
        description="Real-time usage metering: capture usage events, validate and aggregate them, and prove "
        "nothing was lost or counted twice.",
        epilog="Configuration comes from METER_* environment variables (see the README). "
        "Start with `meter up`, then `meter demo --events 100000` in another terminal.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("up", help="start NATS, PostgreSQL, the gateway and Dagster; Ctrl-C stops them all")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("demo", help="send realistic usage traffic through the gateway and check the totals")
    p.add_argument("--events", type=int, default=10_000, help="how many events to send (default 10000)")
    p.add_argument(
        "--rate", type=float, default=None, help="events per second (default: as fast as possible)"
    )
    p.add_argument("--batch-size", type=int, default=500, help="events per request (default 500)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the pipeline to count the events")
    p.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("status", help="the ingest ledger: accepted, stored, duplicates, quarantined")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("usage", help="a meter's usage, as GET /v1/meters/{slug}/usage answers it")
    p.add_argument("meter", help="meter slug (see GET /v1/meters)")
    p.add_argument(
        "--from", dest="start", help="start, RFC 3339 (inclusive; default: the meter's first event)"
    )
    p.add_argument("--to", dest="end", help="end, RFC 3339 (exclusive; default: now)")
    p.add_argument("--window", choices=["minute", "hour", "day", "month"], help="one row per window")
    p.add_argument("--group-by", help="comma-separated dimensions, e.g. customer_id,region")
    p.add_argument("--customer", help="only this customer")
    p.add_argument("--tz", help="IANA zone for window boundaries (default UTC)")
    p.add_argument("--offset", type=int, help="skip this many rows (answers hold at most 10000)")
    p.add_argument("--json", action="store_true", help="print the JSON answer")
    p.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    p.set_defaults(func=cmd_usage)
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
    p = sub.add_parser(
        "replay",
        help="make meters.yaml's changes active, or rebuild named meters, from the stored raw events",
        description="Without arguments, replays every meter that meters.yaml added, changed or removed (what "
        "`meter up` and the Dagster sensor do). With meter slugs, rebuilds those meters' aggregates from the raw "
        "events even when unchanged (e.g. after the reconciliation check found damaged windows). Reports old "
        "against new values per customer.",
    )
    p.add_argument("meters", nargs="*", help="meter slugs to rebuild")
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("migrate", help="apply database migrations to METER_DATABASE_URL")
    p.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meter`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from meter_platform.catalog import CatalogError

        if isinstance(exc, CatalogError | RuntimeError):
            print(f"meter: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
