"""The tiers of graduated and volume charges in ``plans.yaml``: parsed, then checked for order.

:mod:`.plans` re-exports :class:`Tier` and ``TIER_KEYS``; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meter_platform.catalog.plan_values import _ZERO, _AsJson, _check_keys, _number

TIER_KEYS = ("up_to", "unit_price", "flat_fee")


@dataclass(frozen=True)
class Tier(_AsJson):
    """Quantities in (previous tier's ``up_to``, ``up_to``]; ``up_to`` None is the last, open tier."""

    up_to: Decimal | None
    unit_price: Decimal = _ZERO
    flat_fee: Decimal = _ZERO


def _parse_tiers(raw: Any, where: str, errors: list[str]) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        errors.append(f"{where}: tiers must be a non-empty list of {{up_to, unit_price, flat_fee}}.")
        return ()
    tiers: list[Tier] = []
    before = len(errors)
    for k, item in enumerate(raw):
        at = f"{where} tiers[{k}]"
        if not isinstance(item, dict):
            errors.append(f'{at}: a tier must be a mapping such as {{up_to: 1000, unit_price: "0.01"}}.')
            continue
        _check_keys(item, at, TIER_KEYS, errors)
        up_to = None
        if "up_to" not in item:
            errors.append(f"{at}: up_to is required; write up_to: null for the last, open tier.")
        elif item["up_to"] is not None:
            up_to = _number(item["up_to"], at, "up_to", errors, positive=True)
        if "unit_price" not in item and "flat_fee" not in item:
            errors.append(f"{at}: a tier needs a unit_price, a flat_fee or both.")
        price = _number(item.get("unit_price", 0), at, "unit_price", errors)
        flat = _number(item.get("flat_fee", 0), at, "flat_fee", errors)
        tiers.append(Tier(up_to=up_to, unit_price=price or _ZERO, flat_fee=flat or _ZERO))
    # Ordering is only meaningful once every tier parsed; otherwise it would repeat the same mistake.
    if len(errors) == before:
        _check_tier_order(tiers, where, errors)
    return tuple(tiers)


def _check_tier_order(tiers: list[Tier], where: str, errors: list[str]) -> None:
    """Bounds strictly increase and only the last tier is open, so every quantity has one tier."""
    previous: Decimal | None = None
    for k, tier in enumerate(tiers):
        at = f"{where} tiers[{k}]"
        if tier.up_to is None:
            if k != len(tiers) - 1:
                errors.append(f"{at}: only the last tier may be open (up_to: null); give it an up_to.")
            continue
        if previous is not None and tier.up_to == previous:
            errors.append(f"{at}: up_to {tier.up_to} duplicates the previous tier's; remove one of them.")
        elif previous is not None and tier.up_to < previous:
            errors.append(
                f"{at}: up_to {tier.up_to} is below the previous tier's {previous}; "
                "list tiers in increasing up_to."
            )
        previous = tier.up_to
    if tiers[-1].up_to is not None:
        errors.append(
            f"{where}: the last tier must be open (up_to: null) so every quantity has a price; "
            f'add {{up_to: null, unit_price: "…"}}.'
        )
