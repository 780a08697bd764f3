"""What the meters must show: expected totals computed from exactly the events the gateway accepted."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from meter_platform.capture.envelope import property_at
from meter_platform.catalog import Meter


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but not in a meter's filter: a boolean only matches a boolean.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _numeric(value: Any) -> bool:
    if isinstance(value, float):
        # The platform sums the JSON text exactly; a float here would make the expectation inexact.
        raise TypeError(f"expected totals are exact: send numbers as int or Decimal, not float ({value!r})")
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


class Expectation:
    """Expected totals per meter from the events the gateway accepted, each id counted once.

    Handles ``count`` and ``sum`` meters (with their ``filter``); other aggregations are listed in
    :attr:`unchecked`. Sums are exact: values are ints and Decimals, never floats.
    """

    def __init__(self, meters: Iterable[Meter]):
        meters = list(meters)
        self.meters = [m for m in meters if m.aggregation in ("count", "sum")]
        self.unchecked = [m for m in meters if m not in self.meters]
        self.totals: dict[str, Decimal] = {m.slug: Decimal(0) for m in self.meters}
        self._by_type: dict[str, list[Meter]] = {}
        for m in self.meters:
            self._by_type.setdefault(m.event_type, []).append(m)
        self._seen: set[str] = set()
        self.unique = 0
        self.duplicates = 0

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        """Count accepted events; an id seen before adds nothing (the platform dedups it)."""
        for event in events:
            if event["id"] in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(event["id"])
            self.unique += 1
            properties = event.get("properties") or {}
            for meter in self._by_type.get(event["event_type"], ()):
                if not all(
                    any(_same(property_at(properties, key), v) for v in values)
                    for key, values in meter.filter.items()
                ):
                    continue
                if meter.aggregation == "count":
                    self.totals[meter.slug] += 1
                else:
                    value = property_at(properties, meter.value_property or "")
                    if _numeric(value):  # the platform ignores a missing or non-numeric value in a sum
                        self.totals[meter.slug] += Decimal(value)
