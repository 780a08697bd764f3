"""The values of ``plans.yaml``: exact decimals read from YAML, allowed keys, and their JSON form.

Shared by :mod:`.plans` and :mod:`.plan_tiers`. A price is read as a decimal string or an integer; a
YAML float is refused because ``0.1`` as a float is not 0.1, and an invoice must add up to the cent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from decimal import Decimal
from typing import Any

from meter_platform.billing.money import decimal_str, parse_decimal

_ZERO = Decimal(0)


class _AsJson:
    def as_json(self) -> dict[str, Any]:
        """As a JSON-able dict: every amount a decimal string (exact), tuples as lists."""
        return _as_json(self)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return decimal_str(value)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value.as_json() if hasattr(value, "as_json") else value


def _as_json(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as JSON: decimals as strings (exact), tuples as lists, parts by as_json."""
    return {f.name: _json_value(getattr(obj, f.name)) for f in fields(obj)}


def _number(raw: Any, where: str, name: str, errors: list[str], *, positive: bool = False) -> Decimal | None:
    """Parse a non-negative (or, with ``positive``, a > 0) decimal from a YAML string or integer."""
    try:
        value = parse_decimal(raw)
    except ValueError as exc:
        errors.append(f"{where}: {name} {exc}")
        return None
    if value < 0 or (positive and value == 0):
        errors.append(f"{where}: {name} {raw!r} must be {'greater than 0' if positive else 'at least 0'}.")
        return None
    return value


def _check_keys(raw: Mapping[Any, Any], where: str, allowed: tuple[str, ...], errors: list[str]) -> None:
    for key in raw:
        if key not in allowed:
            errors.append(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}.")
