"""The ``meter`` command: one module per command group, gathered here in pipeline order."""

from __future__ import annotations

import argparse
import os
import sys

from meter_platform.cli import archive, billing, keys, meters, platform, quarantine, usage
from meter_platform.cli.demo import command as demo_command

GROUPS = (platform, demo_command, usage, quarantine, meters, billing, archive, keys)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``meter``."""
    parser = argparse.ArgumentParser(
        prog="meter",
        description="Real-time usage metering and billing: capture usage events, validate and aggregate "
        "them, bill them, and prove nothing was lost or counted twice.",
        epilog="Configuration comes from METER_* environment variables (see the README). "
        "Start with `meter up`, then `meter demo --events 100000` in another terminal.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
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
        from meter_platform.errors import PlatformError

        if isinstance(exc, CatalogError | RuntimeError | PlatformError):
            print(f"meter: {exc}", file=sys.stderr)
            return 2
        raise


__all__ = ["build_parser", "main"]
