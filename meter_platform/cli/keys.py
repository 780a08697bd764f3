"""``meter keys create|list|revoke``: API keys, on the database directly (like ``meter invoices``)."""

from __future__ import annotations

import argparse
import json
import sys

from meter_platform.cli.common import database_url, print_table


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def cmd_keys_create(args: argparse.Namespace) -> int:
    from meter_platform.access import keys
    from meter_platform.storage import db

    with db.connect(database_url()) as conn:
        key, secret = keys.create_key(
            conn,
            args.scope,
            name=args.name,
            customer_id=args.customer,
            events_per_second=args.events_per_second,
            requests_per_second=args.requests_per_second,
        )
        conn.commit()
    shown = key.as_json()
    if args.json:
        print(json.dumps({k: shown[k] for k in ("id", "scopes", "name", "customer_id", "created_at")}
                         | {"key": secret}, indent=2))  # fmt: skip
        return 0
    print(f"created {key.id} (scopes: {', '.join(key.scopes)}"
          + (f", customer {key.customer_id}" if key.customer_id else "") + ")")  # fmt: skip
    print(secret)
    print("This is the only time the key is shown; only its hash is stored.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from meter_platform.access import keys
    from meter_platform.storage import db

    with db.connect(database_url()) as conn:
        found = [k.as_json() for k in keys.list_keys(conn)]
    if args.json:
        print(json.dumps({"keys": found}, indent=2))
        return 0
    rows = [
        [k["id"], k["prefix"] + "…", k["name"] or "", ",".join(k["scopes"]), k["customer_id"] or "",
         _when(k["created_at"]), _when(k["last_used_at"]), _when(k["revoked_at"])]
        for k in found
    ]  # fmt: skip
    print_table(["id", "prefix", "name", "scopes", "customer", "created", "last used", "revoked"], rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from meter_platform.access import keys
    from meter_platform.storage import db

    with db.connect(database_url()) as conn:
        key = keys.revoke_key(conn, args.id)
        conn.commit()
    print(
        f"revoked {key.id}; the gateway refuses it within its key cache time (METER_AUTH_CACHE_SECONDS, 5 s)"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    from meter_platform.access.keys import DEFAULT_EVENTS_PER_SECOND, DEFAULT_REQUESTS_PER_SECOND, SCOPES

    p = sub.add_parser("keys", help="create, list and revoke API keys (on the database directly)")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = ksub.add_parser("create", help="create a key and print it, once")
    k.add_argument("--scope", action="append", required=True, choices=SCOPES,
                   help="ingest (send events), read (read everything but admin routes), admin; repeatable")  # fmt: skip
    k.add_argument("--name", help="what the key is for")
    k.add_argument("--customer", help="bind the key to this customer: it sees and sends only its data")
    k.add_argument("--events-per-second", type=float, default=DEFAULT_EVENTS_PER_SECOND,
                   help=f"rate limit on events (default {DEFAULT_EVENTS_PER_SECOND:,.0f})")  # fmt: skip
    k.add_argument("--requests-per-second", type=float, default=DEFAULT_REQUESTS_PER_SECOND,
                   help=f"rate limit on requests (default {DEFAULT_REQUESTS_PER_SECOND:,.0f})")  # fmt: skip
    k.add_argument("--json", action="store_true", help="print the key as JSON")
    k.set_defaults(func=cmd_keys_create)
    k = ksub.add_parser("list", help="every key: id, prefix, name, scopes, created, last used, revoked")
    k.add_argument("--json", action="store_true", help="print them as JSON")
    k.set_defaults(func=cmd_keys_list)
    k = ksub.add_parser("revoke", help="revoke a key by id")
    k.add_argument("id", help="the key's id (key_...)")
    k.set_defaults(func=cmd_keys_revoke)
