"""Billing periods (calendar months in UTC), proration, and subscription segments within a period.

Times are timezone-aware and intervals half-open, [start, end): the instant a plan changes belongs to
the new plan only, so no second is billed twice or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, localcontext
from itertools import pairwise
from typing import Protocol

from meter_platform.billing.money import EXACT

_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")
_PRORATE_GRID = Decimal("1e-30")


def _aware(dt: datetime, name: str) -> datetime:
    # A naive datetime has no instant; guessing its zone would shift a period boundary by hours.
    if not isinstance(dt, datetime) or dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {dt!r}")
    return dt.astimezone(UTC)


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """The UTC start (inclusive) and end (exclusive) of a ``YYYY-MM`` billing period.

    ``period_bounds("2026-03") == (2026-03-01T00:00Z, 2026-04-01T00:00Z)``; raises ValueError otherwise.
    """
    match = _PERIOD.match(period) if isinstance(period, str) else None
    if match is None:
        raise ValueError(f"billing period {period!r} must be written YYYY-MM, e.g. 2026-03")
    year, month = int(match[1]), int(match[2])
    if not 1 <= month <= 12 or year < 1 or (year, month) == (9999, 12):
        raise ValueError(f"billing period {period!r} is not a month between 0001-01 and 9999-11")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def period_key(dt: datetime) -> str:
    """The ``YYYY-MM`` billing period (UTC month) that contains the aware datetime ``dt``."""
    utc = _aware(dt, "dt")
    return f"{utc.year:04d}-{utc.month:02d}"


def microseconds(delta: timedelta) -> int:
    """``delta`` in whole microseconds, exactly (``total_seconds()`` is a float)."""
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def prorate(
    amount: Decimal,
    segment_start: datetime,
    segment_end: datetime,
    period_start: datetime,
    period_end: datetime,
) -> Decimal:
    """``amount`` * segment duration / period duration, from exact integer microseconds.

    A whole period returns ``amount`` itself. Otherwise a quotient that does not terminate is truncated to
    30 decimal places (see ``money.EXACT``), so rounding it half-up gives the cent of the exact fraction.
    Raises ValueError unless period_start < period_end and the segment lies within the period.
    """
    seg_start, seg_end = _aware(segment_start, "segment_start"), _aware(segment_end, "segment_end")
    per_start, per_end = _aware(period_start, "period_start"), _aware(period_end, "period_end")
    if not per_start < per_end:
        raise ValueError(f"the period must end after it starts: {per_start} .. {per_end}")
    if not per_start <= seg_start <= seg_end <= per_end:
        raise ValueError(
            f"segment {seg_start} .. {seg_end} is not within the period {per_start} .. {per_end}"
        )
    part, whole = microseconds(seg_end - seg_start), microseconds(per_end - per_start)
    if part == whole:
        return amount
    with localcontext(EXACT):
        share = amount * part / whole
        # Truncating (never rounding) to 30 decimal places keeps the JSON readable and, on a grid finer
        # than any minor unit, still rounds half-up to the same cent as the exact fraction.
        truncated = share.quantize(_PRORATE_GRID, rounding=ROUND_DOWN)
        return share if truncated == share else truncated


class SubscriptionLike(Protocol):
    """What segmenting needs of a subscription: its plan and when it runs ([starts_at, ends_at))."""

    @property
    def plan(self) -> str: ...

    @property
    def starts_at(self) -> datetime: ...

    @property
    def ends_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class Subscription:
    """A customer on ``plan`` from ``starts_at`` until ``ends_at`` (exclusive; None: still running)."""

    plan: str
    starts_at: datetime
    ends_at: datetime | None = None


@dataclass(frozen=True)
class Segment:
    """A subscription's piece inside a billing period: ``plan`` from ``start`` to ``end`` (exclusive)."""

    plan: str
    start: datetime
    end: datetime
    # The subscription it came from, for the caller's bookkeeping; not part of equality.
    subscription: SubscriptionLike | None = field(default=None, compare=False, repr=False)


def segments(
    subscriptions: Iterable[SubscriptionLike], period_start: datetime, period_end: datetime
) -> list[Segment]:
    """The parts of ``subscriptions`` inside [period_start, period_end), in time order; empty ones skipped.

    Raises ValueError when two of them overlap: usage in the overlap would be billed twice. A plan change
    at an instant T is one subscription ending at T and the next starting at T.
    """
    per_start, per_end = _aware(period_start, "period_start"), _aware(period_end, "period_end")
    out: list[Segment] = []
    for sub in subscriptions:
        start = max(_aware(sub.starts_at, "starts_at"), per_start)
        end = per_end if sub.ends_at is None else min(_aware(sub.ends_at, "ends_at"), per_end)
        if start < end:
            out.append(Segment(plan=sub.plan, start=start, end=end, subscription=sub))
    out.sort(key=lambda s: (s.start, s.end, s.plan))
    for before, after in pairwise(out):
        if after.start < before.end:
            raise ValueError(
                f"subscriptions overlap: {before.plan!r} until {before.end.isoformat()} and "
                f"{after.plan!r} from {after.start.isoformat()}; end one where the next starts"
            )
    return out
