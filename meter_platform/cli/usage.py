"""``meter usage``: a meter's usage from the gateway, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meter_platform.cli.common import auth_headers, gateway_url, print_table


def cmd_usage(args: argparse.Namespace) -> int:
    import httpx

    url = gateway_url(args)
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
    query: list[tuple[str, Any]] = list(params.items())
    for item in args.filter or []:
        dim, sep, value = item.partition("=")
        if not sep or not dim:
            print(
                f"meter usage: --filter takes dimension=value, e.g. region=eu-west-1 (got {item!r})",
                file=sys.stderr,
            )
            return 2
        query.append((f"filter[{dim}]", value))
    try:
        response = httpx.get(
            f"{url}/v1/meters/{args.meter}/usage", params=query, timeout=60, headers=auth_headers()
        )
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
    print(
        f"{answer['meter']}: [{answer['from']}, {answer['to']}) window={answer['window'] or 'none'} tz={answer['tz']}"
    )
    print_table(header, rows)
    if not rows:
        print("(no usage in this range)")
    if "next_offset" in answer:
        print(f"... more rows: repeat with --offset {answer['next_offset']}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
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
    p.add_argument(
        "--filter",
        action="append",
        metavar="DIM=VALUE",
        help="only rows whose dimension has this value (repeat: any of the values of a dimension, "
        "all of the dimensions), e.g. --filter region=eu-west-1",
    )
    p.add_argument("--offset", type=int, help="skip this many rows (answers hold at most 10000)")
    p.add_argument("--json", action="store_true", help="print the JSON answer")
    p.add_argument("--gateway", help="gateway URL (default: the one `meter up` started)")
    p.set_defaults(func=cmd_usage)
