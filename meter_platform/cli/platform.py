"""``meter up``, ``meter status``, ``meter migrate``: running the platform and reading its ledger."""

from __future__ import annotations

import argparse
import json
import sys

from meter_platform.cli.common import auth_headers, gateway_url
from meter_platform.config import load_settings


def cmd_up(args: argparse.Namespace) -> int:
    from meter_platform.runtime.up import up

    return up(nats_cluster=args.nats_cluster or 0)


def cmd_migrate(args: argparse.Namespace) -> int:
    from meter_platform.config import require_url
    from meter_platform.storage import db

    url = require_url(load_settings().database_url, "METER_DATABASE_URL")
    applied = db.migrate(url)
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url = gateway_url(args)
    try:
        response = httpx.get(f"{url}/v1/ingest/status", timeout=10, headers=auth_headers())
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {url} ({exc}); is `meter up` running?", file=sys.stderr)
        return 2
    if response.status_code in (401, 403):
        print(f"meter status: {response.json().get('error')} (set METER_API_KEY, or see .meter/api-key)",
              file=sys.stderr)  # fmt: skip
        return 2
    answer = response.json()
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    ev, st, co = answer["events"] or {}, answer["stream"] or {}, answer["consumer"] or {}

    def n(part: dict, key: str) -> str:
        value = part.get(key)
        return "unknown" if value is None else f"{value:,}"

    if answer.get("degraded"):
        print(f"DEGRADED: no answer from {', '.join(answer['degraded'])}; what is known follows")
    print(f"stream {st.get('name', '?')}: last seq {n(st, 'last_seq')}, {n(st, 'messages')} messages waiting")
    uncounted = f", {n(co, 'uncounted')} not yet counted" if "uncounted" in co else ""
    print(f"consumer: {n(co, 'pending')} pending{uncounted}, ack floor {n(co, 'ack_floor')}")
    if ev.get("processed") is not None:
        print(
            f"events processed {n(ev, 'processed')} = stored {n(ev, 'stored')} + duplicates {n(ev, 'duplicates')}"
            f" + quarantined {n(ev, 'quarantined')}  ({'balanced' if ev.get('balanced') else 'NOT BALANCED'})"
        )
    else:
        print("events: unknown (the database did not answer)")
    if ev.get("replayed_from_quarantine") or ev.get("duplicates_from_quarantine"):
        print(
            f"moved out of quarantine by replays: {ev.get('replayed_from_quarantine', 0):,} stored,"
            f" {ev.get('duplicates_from_quarantine', 0):,} duplicates"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("up", help="start NATS, PostgreSQL, the gateway and Dagster; Ctrl-C stops them all")
    p.add_argument(
        "--nats-cluster",
        type=int,
        metavar="N",
        help="run NATS as a cluster of N nodes (3: the events stream keeps 3 replicas and survives losing one)",
    )
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="the ingest ledger: accepted, stored, duplicates, quarantined")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("migrate", help="apply database migrations to METER_DATABASE_URL")
    p.set_defaults(func=cmd_migrate)
