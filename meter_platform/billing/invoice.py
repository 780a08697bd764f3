"""Invoice assembly: the lines of one subscription segment, late-usage adjustments, and totals.

Each line is rounded once, half-up, to the currency's minor unit, with its precise amount beside it;
totals are sums of rounded lines, so the printed lines always add up to the printed total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meter_platform.billing.money import EXACT, decimal_str, is_rounded, round_money
from meter_platform.billing.periods import microseconds, period_bounds, prorate
from meter_platform.billing.pricing import TIMES, Priced, TierUse, price
from meter_platform.catalog.plans import Charge, Plan

LINE_TYPES = ("base_fee", "usage", "minimum", "adjustment")

#: For a charge (already scoped by the caller to the segment's time range): one entry per group, each
#: (group values by dimension or None, the meter's value, the number of events counted).
UsageFn = Callable[[Charge], list[tuple[dict[str, Any] | None, Decimal, int]]]


def rfc3339(dt: datetime) -> str:
    """``dt`` in UTC with microseconds, e.g. ``2026-03-01T00:00:00.000000Z``."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Line:
    """One invoice line: ``amount`` is rounded to the currency; ``precise_amount`` is not."""

    type: str
    plan: str
    meter: str | None
    # A dict is unhashable; leave it out of the hash (it still takes part in equality).
    group: dict[str, Any] | None = field(hash=False)
    description: str
    quantity: Decimal | None
    amount: Decimal
    precise_amount: Decimal
    service_period_start: datetime
    service_period_end: datetime
    tiers: tuple[TierUse, ...] = ()
    adjusts_period: str | None = None
    events: int | None = None  # usage: events the meter counted (percentage fees); adjustment: the change

    def as_json(self) -> dict[str, Any]:
        """The line as a JSON-able dict: decimal strings and RFC 3339 UTC times."""
        return {
            "type": self.type,
            "plan": self.plan,
            "meter": self.meter,
            "group": None if self.group is None else dict(self.group),
            "description": self.description,
            "quantity": None if self.quantity is None else decimal_str(self.quantity),
            "amount": decimal_str(self.amount),
            "precise_amount": decimal_str(self.precise_amount),
            "service_period_start": rfc3339(self.service_period_start),
            "service_period_end": rfc3339(self.service_period_end),
            "tiers": [_tier_json(t) for t in self.tiers],
            "adjusts_period": self.adjusts_period,
            "events": self.events,
        }


def _tier_json(t: TierUse) -> dict[str, Any]:
    return {
        "index": t.index,
        "from": decimal_str(t.from_),
        "up_to": None if t.up_to is None else decimal_str(t.up_to),
        "units": decimal_str(t.units),
        "unit_price": decimal_str(t.unit_price),
        "flat_fee": decimal_str(t.flat_fee),
        "amount": decimal_str(t.amount),
    }


def _n(value: Decimal) -> str:
    return format(value, ",f")


def _share_note(start: datetime, end: datetime, period_start: datetime, period_end: datetime) -> str:
    """`` x 1,296,000 s / 2,678,400 s of the period`` (with U+00D7) for a partial period; else empty."""
    part, whole = microseconds(end - start), microseconds(period_end - period_start)
    if part == whole:
        return ""
    # normalize() drops the trailing zeros of whole seconds: 1,296,000 rather than 1,296,000.000000.
    seconds = [Decimal(us).scaleb(-6).normalize() for us in (part, whole)]
    return f" {TIMES} {_n(seconds[0])} s / {_n(seconds[1])} s of the period"


def _group_text(charge: Charge, group: Mapping[str, Any] | None) -> str:
    if not group:
        return ""
    return " [" + ", ".join(f"{k}={group.get(k)}" for k in charge.group_by) + "]"


def _checked_usage(
    charge: Charge, entries: list[tuple[dict[str, Any] | None, Decimal, int]]
) -> list[tuple[dict[str, Any] | None, Decimal, int]]:
    """The usage entries in a deterministic order, after checking they fit the charge's group_by.

    No usage at all still yields one zero line, so a first tier's flat fee is charged and the invoice
    shows the meter was looked at.
    """
    if not entries:
        return [(None, Decimal(0), 0)]
    seen: set[tuple[str, ...]] = set()
    for group, _, _ in entries:
        if not charge.group_by:
            if group is not None or len(entries) > 1:
                raise ValueError(
                    f"charge on {charge.meter!r} has no group_by: give one entry with group None"
                )
            continue
        if group is None or set(group) != set(charge.group_by):
            raise ValueError(f"usage of {charge.meter!r} must be grouped by exactly {list(charge.group_by)}")
        key = tuple(str(group[k]) for k in charge.group_by)
        if key in seen:
            # The same group twice would bill the same usage twice.
            raise ValueError(f"usage of {charge.meter!r} lists group {dict(group)} twice")
        seen.add(key)

    def order(entry: tuple[dict[str, Any] | None, Decimal, int]) -> tuple[tuple[bool, str], ...]:
        group = entry[0] or {}
        return tuple((group.get(k) is not None, str(group.get(k))) for k in charge.group_by)

    return sorted(entries, key=order)


def _usage_line(
    plan: Plan, charge: Charge, group: dict[str, Any] | None, priced: Priced, start: datetime, end: datetime
) -> Line:
    return Line(
        type="usage",
        plan=plan.key,
        meter=charge.meter,
        group=None if group is None else dict(group),
        description=priced.description() + _group_text(charge, group),
        quantity=priced.quantity,
        amount=round_money(priced.precise_amount, plan.currency),
        precise_amount=priced.precise_amount,
        service_period_start=start,
        service_period_end=end,
        tiers=priced.tiers,
        events=priced.events,
    )


def _minimum_line(
    plan: Plan, billed: Decimal, start: datetime, end: datetime, period_start: datetime, period_end: datetime
) -> Line | None:
    """The shortfall of ``billed`` (rounded lines of the segment) against the prorated minimum, if any."""
    assert plan.minimum is not None
    committed = prorate(plan.minimum, start, end, period_start, period_end)
    if billed >= committed:
        return None
    shortfall = EXACT.subtract(committed, billed)
    # billed is whole minor units, so rounding the shortfall equals rounding the commitment minus billed.
    amount = round_money(shortfall, plan.currency)
    if not amount:
        return None
    share = _share_note(start, end, period_start, period_end)
    return Line(
        type="minimum",
        plan=plan.key,
        meter=None,
        group=None,
        description=(
            f"{plan.name} minimum commitment {decimal_str(plan.minimum)} {plan.currency}{share}"
            f" = {round_money(committed, plan.currency)}, less {decimal_str(billed)} billed"
        ),
        quantity=None,
        amount=amount,
        precise_amount=shortfall,
        service_period_start=start,
        service_period_end=end,
    )


def build_lines(
    plan: Plan,
    segment_start: datetime,
    segment_end: datetime,
    period_start: datetime,
    period_end: datetime,
    usage: UsageFn,
) -> list[Line]:
    """The invoice lines of one subscription segment on ``plan`` within a billing period.

    In order: the base fee (prorated to the segment) when the plan has one; one usage line per charge,
    or per group in sorted order when the charge has group_by; then a minimum line when the segment's
    rounded lines fall short of the prorated minimum commitment.
    """
    lines: list[Line] = []
    if plan.base_fee is not None:
        precise = prorate(plan.base_fee, segment_start, segment_end, period_start, period_end)
        share = _share_note(segment_start, segment_end, period_start, period_end)
        lines.append(
            Line(
                type="base_fee",
                plan=plan.key,
                meter=None,
                group=None,
                description=f"{plan.name} base fee {decimal_str(plan.base_fee)} {plan.currency}{share}",
                quantity=None,
                amount=round_money(precise, plan.currency),
                precise_amount=precise,
                service_period_start=segment_start,
                service_period_end=segment_end,
            )
        )
    for charge in plan.charges:
        for group, quantity, events in _checked_usage(charge, usage(charge)):
            priced = price(charge, quantity, events)
            lines.append(_usage_line(plan, charge, group, priced, segment_start, segment_end))
    if plan.minimum is not None:
        billed = sum((line.amount for line in lines), round_money(Decimal(0), plan.currency))
        minimum = _minimum_line(plan, billed, segment_start, segment_end, period_start, period_end)
        if minimum is not None:
            lines.append(minimum)
    return lines


def adjustment_lines(
    plan: Plan,
    charge: Charge,
    billed_quantity: Decimal,
    billed_events: int,
    new_quantity: Decimal,
    new_events: int,
    adjusts_period: str,
    *,
    group: dict[str, Any] | None = None,
    service_period_start: datetime | None = None,
    service_period_end: datetime | None = None,
) -> Line | None:
    """A line correcting ``charge`` of a past period whose usage changed after it was invoiced.

    The amount is price(new) - price(billed), rounded once; None when that rounds to zero. The caller
    should keep ``billed_*`` unchanged when None is returned, so small late changes accumulate until
    they are worth a line. The service period defaults to the whole of ``adjusts_period``.
    """
    default_start, default_end = period_bounds(adjusts_period)
    new, old = price(charge, new_quantity, new_events), price(charge, billed_quantity, billed_events)
    precise = EXACT.subtract(new.precise_amount, old.precise_amount)
    amount = round_money(precise, plan.currency)
    if not amount:
        return None
    return Line(
        type="adjustment",
        plan=plan.key,
        meter=charge.meter,
        group=None if group is None else dict(group),
        description=(
            f"Adjustment for {adjusts_period}{_group_text(charge, group)}: now {new.description()}"
            f" = {decimal_str(new.precise_amount)}; was {old.description()} = {decimal_str(old.precise_amount)}"
        ),
        quantity=EXACT.subtract(new_quantity, billed_quantity),
        amount=amount,
        precise_amount=precise,
        service_period_start=service_period_start or default_start,
        service_period_end=service_period_end or default_end,
        adjusts_period=adjusts_period,
        events=new_events - billed_events,
    )


def totals(lines: Iterable[Line], currency: str) -> tuple[Decimal, Decimal]:
    """(subtotal, total) of rounded line amounts in ``currency``.

    The subtotal is the period's own lines (base fees, usage, minimums); the total adds adjustments of
    earlier periods, and may be negative (a credit). Raises ValueError for an amount not in whole minor
    units of ``currency`` (a line of another currency, or one never rounded).
    """
    subtotal = total = round_money(Decimal(0), currency)
    for line in lines:
        if line.type not in LINE_TYPES:
            raise ValueError(f"unknown line type {line.type!r}")
        if not is_rounded(line.amount, currency):
            raise ValueError(f"line amount {line.amount} is not in whole minor units of {currency}")
        total += line.amount
        if line.type != "adjustment":
            subtotal += line.amount
    return subtotal, total
