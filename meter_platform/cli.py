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
    from meter_platform.platform import read_runtime

    runtime = read_runtime()
    if runtime.get("gateway_url"):
        return runtime["gateway_url"]
    settings = load_settings()
    return f"http://{settings.gateway_host}:{settings.gateway_port}"


def cmd_up(args: argparse.Namespace) -> int:
    from meter_platform.platform import up

    return up()


def cmd_migrate(args: argparse.Namespace) -> int:
    from meter_platform import db
    from meter_platform.config import require_url

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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meter_platform.demo import run

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
