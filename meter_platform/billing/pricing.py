"""Pricing: what one charge costs for a meter's value over a service period, before any rounding.

The amount here is precise (unrounded); the invoice rounds each line once. Every result carries what a
finance person needs to recompute it: the raw and billable quantities and, for tiered models, the units,
price and flat fee of each tier used.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext

from meter_platform.billing.money import EXACT
from meter_platform.catalog.plans import Charge, Tier

_ZERO = Decimal(0)
# Typographic signs for descriptions people read; spelled as escapes so no look-alike hides in the source.
TIMES = "\u00d7"
MINUS = "\u2212"


@dataclass(frozen=True)
class TierUse:
    """The part of a tiered price that falls in one tier (unrounded).

    ``index`` counts from 1 as on an invoice; the tier covers (``from_``, ``up_to``]; ``units`` are the
    units priced at ``unit_price`` in it; ``amount`` = units * unit_price + flat_fee.
    """

    index: int
    from_: Decimal
    up_to: Decimal | None
    units: Decimal
    unit_price: Decimal
    flat_fee: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Priced:
    """A charge priced: ``quantity`` as metered, ``billable`` after free units, the precise amount."""

    charge: Charge
    quantity: Decimal
    billable: Decimal
    precise_amount: Decimal
    tiers: tuple[TierUse, ...] = ()
    events: int = 0

    def description(self) -> str:
        """The line in words, with every number needed to recompute it.

        For example ``1,500 api_calls: 1,500 \u00d7 0.008 (tier 2, volume) + 2.00 flat`` (with the
        multiplication sign U+00D7; a minus sign U+2212 where free units come off).
        """
        c = self.charge
        head = f"{_n(self.quantity)} {c.meter}"
        if c.free_units:
            head += f" {MINUS} {_n(c.free_units)} free = {_n(self.billable)}"
        if c.model == "per_unit":
            return f"{head}: {_n(self.billable)} {TIMES} {_n(_req(c.unit_price))}"
        if c.model == "volume":
            (t,) = self.tiers
            return f"{head}: {_n(t.units)} {TIMES} {_n(t.unit_price)} (tier {t.index}, volume){_flat(t.flat_fee)}"
        if c.model == "graduated":
            parts = [
                f"tier {t.index}: {_n(t.units)} {TIMES} {_n(t.unit_price)}{_flat(t.flat_fee)}"
                for t in self.tiers
            ]
            return f"{head}, graduated: " + "; ".join(parts)
        if c.model == "package":
            size, count = _req(c.package_size), _packages(self.billable, _req(c.package_size))
            noun = "package" if count == 1 else "packages"
            return f"{head}: {_n(count)} {noun} of {_n(size)} {TIMES} {_n(_req(c.package_price))}"
        text = f"{head}: {_n(self.billable)} {TIMES} {_n(_req(c.rate))}%"
        if c.fixed_fee:
            text += f" + {_n(Decimal(self.events))} events {TIMES} {_n(c.fixed_fee)}"
        return text


def _n(value: Decimal) -> str:
    """A number for people: thousands separators, no exponent (``1,500``, ``0.00015``)."""
    return format(value, ",f")


def _flat(fee: Decimal) -> str:
    return f" + {_n(fee)} flat" if fee else ""


def _req(value: Decimal | None) -> Decimal:
    # Plan loading guarantees a model's required fields; a None here is a programming error.
    if value is None:
        raise ValueError("the charge lacks a field its model requires; build charges with parse_plans")
    return value


def _packages(billable: Decimal, size: Decimal) -> Decimal:
    """Packages started: ceil(billable / size), exactly (divmod is exact where a division might not be)."""
    with localcontext(EXACT):
        whole, rest = divmod(billable, size)
        return whole + (1 if rest else 0)


def _graduated(tiers: tuple[Tier, ...], q: Decimal) -> tuple[TierUse, ...]:
    """Each unit at the price of its own tier; a tier's flat fee once the quantity enters it.

    The first tier is always entered, so its flat fee is due even at zero; a later tier is entered when
    the quantity exceeds the previous bound.
    """
    used: list[TierUse] = []
    lower = _ZERO
    for i, tier in enumerate(tiers):
        if i > 0 and q <= lower:
            break
        top = q if tier.up_to is None else min(q, tier.up_to)
        units = max(_ZERO, top - lower)
        amount = units * tier.unit_price + tier.flat_fee
        used.append(TierUse(i + 1, lower, tier.up_to, units, tier.unit_price, tier.flat_fee, amount))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return tuple(used)


def _volume(tiers: tuple[Tier, ...], q: Decimal) -> TierUse:
    """Every unit at the price of the tier that contains the whole quantity (zero is in the first)."""
    lower = _ZERO
    for i, tier in enumerate(tiers):
        if tier.up_to is None or q <= tier.up_to:
            amount = q * tier.unit_price + tier.flat_fee
            return TierUse(i + 1, lower, tier.up_to, q, tier.unit_price, tier.flat_fee, amount)
        lower = tier.up_to
    raise ValueError("the tiers have no open last tier; build charges with parse_plans")


def price(charge: Charge, quantity: Decimal, events: int = 0) -> Priced:
    """Price ``charge`` for ``quantity`` (the meter's value over the service period), unrounded.

    ``events`` is the number of events the meter counted in the service period; only the percentage
    model uses it (its fixed fee is per event). Free units come off first and nothing is billed below
    zero, so a negative net quantity (refunds) costs nothing rather than crediting.
    """
    if not isinstance(quantity, Decimal):
        raise TypeError(f"quantity must be a Decimal, not {type(quantity).__name__}")
    if events < 0:
        raise ValueError(f"events must be at least 0, not {events}")
    # Every operation below is exact (see money.EXACT), not rounded to the default 28 digits.
    with localcontext(EXACT):
        billable = max(_ZERO, quantity - charge.free_units)
        tiers, amount = _amount(charge, billable, events)
    return Priced(charge, quantity, billable, amount, tiers, events)


def _amount(charge: Charge, billable: Decimal, events: int) -> tuple[tuple[TierUse, ...], Decimal]:
    tiers: tuple[TierUse, ...] = ()
    if charge.model == "per_unit":
        amount = billable * _req(charge.unit_price)
    elif charge.model == "graduated":
        tiers = _graduated(charge.tiers, billable)
        amount = sum((t.amount for t in tiers), _ZERO)
    elif charge.model == "volume":
        tiers = (_volume(charge.tiers, billable),)
        amount = tiers[0].amount
    elif charge.model == "package":
        count = _packages(billable, _req(charge.package_size))
        amount = count * _req(charge.package_price)
    elif charge.model == "percentage":
        # rate is in percent; scaleb(-2) divides by 100 exactly.
        amount = (billable * _req(charge.rate)).scaleb(-2) + events * charge.fixed_fee
    else:
        raise ValueError(f"unknown pricing model {charge.model!r}")
    return tiers, amount
