"""The ``meter`` command: one module per command group."""

from meter_platform.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
