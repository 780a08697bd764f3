"""``meter demo``: realistic traffic through the gateway, checked meter by meter."""

from __future__ import annotations

import argparse

from meter_platform.cli.common import gateway_url


def cmd_demo(args: argparse.Namespace) -> int:
    from meter_platform.cli.demo import run

    return run(args, gateway_url(args))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
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
