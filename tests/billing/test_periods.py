"""Billing periods are UTC months, half-open; proration is exact to the microsecond."""

# Comments show the arithmetic with the multiplication sign (U+00D7) on purpose.
# ruff: noqa: RUF003

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal as D
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_platform.billing.money import round_money
from meter_platform.billing.periods import (
    Segment,
    Subscription,
    microseconds,
    period_bounds,
    period_key,
    prorate,
    segments,
)

MAR_1 = datetime(2026, 3, 1, tzinfo=UTC)
MAR_16 = datetime(2026, 3, 16, tzinfo=UTC)
APR_1 = datetime(2026, 4, 1, tzinfo=UTC)


def test_period_bounds_are_the_utc_month_half_open():
    assert period_bounds("2026-03") == (MAR_1, APR_1)
    assert period_bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("2028-02")[1] - period_bounds("2028-02")[0] == timedelta(days=29)


@pytest.mark.parametrize(
    "bad", ["2026-3", "2026-13", "2026-00", "26-03", "2026/03", "2026-03-01", "", "9999-12"]
)
def test_period_bounds_refuses_anything_but_yyyy_mm(bad: str):
    with pytest.raises(ValueError, match=r"2026-03|9999-11"):
        period_bounds(bad)


def test_period_key_is_the_utc_month():
    assert period_key(datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)) == "2026-03"
    assert period_key(APR_1) == "2026-04"
    # 2026-04-01 01:00 in UTC+2 is still March in UTC.
    assert period_key(datetime(2026, 4, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))) == "2026-03"
    with pytest.raises(ValueError, match="timezone-aware"):
        period_key(datetime(2026, 3, 1))


def test_prorate_by_exact_seconds():
    # 31-day month; Mar 16 00:00 splits it into 15 and 16 days.
    assert prorate(D("31.00"), MAR_1, MAR_16, MAR_1, APR_1) == D("15.00")  # 31 × 15/31
    assert str(prorate(D("31.00"), MAR_1, MAR_16, MAR_1, APR_1)) == "15.00"
    # 100 × 16/31 = 51.612903225806451612903225806451612903…, truncated to 30 decimals.
    assert prorate(D("100.00"), MAR_16, APR_1, MAR_1, APR_1) == D("51.612903225806451612903225806451")
    assert prorate(D("100.00"), MAR_1, APR_1, MAR_1, APR_1) == D("100.00")  # the whole period: as is
    assert prorate(D("100.00"), MAR_16, MAR_16, MAR_1, APR_1) == 0
    # One microsecond of February 2026 (28 days = 2,419,200 s): 2,419,200 × 1/2,419,200,000,000.
    feb_1, mar_1 = period_bounds("2026-02")
    one_us = feb_1 + timedelta(microseconds=1)
    assert prorate(D(2_419_200), feb_1, one_us, feb_1, mar_1) == D("0.000001")


def test_prorate_refuses_a_segment_outside_the_period_and_naive_times():
    with pytest.raises(ValueError, match="not within the period"):
        prorate(D(1), MAR_1 - timedelta(days=1), MAR_16, MAR_1, APR_1)
    with pytest.raises(ValueError, match="end after it starts"):
        prorate(D(1), MAR_1, MAR_1, MAR_1, MAR_1)
    with pytest.raises(ValueError, match="timezone-aware"):
        prorate(D(1), datetime(2026, 3, 2), MAR_16, MAR_1, APR_1)


def exact_half_up(value: Fraction, places: int) -> D:
    """Round a fraction half-up (away from zero) with integers only: the reference for proration."""
    scaled = abs(value) * 10**places
    whole, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest >= scaled.denominator:
        whole += 1
    return (D(whole) if value >= 0 else -D(whole)).scaleb(-places)


@settings(max_examples=300, deadline=None)
@given(
    cents=st.integers(0, 10**9),
    a=st.integers(0, microseconds(APR_1 - MAR_1)),
    b=st.integers(0, microseconds(APR_1 - MAR_1)),
)
def test_rounded_proration_equals_rounding_the_exact_fraction(cents: int, a: int, b: int):
    amount = D(cents).scaleb(-2)
    start, end = (MAR_1 + timedelta(microseconds=x) for x in sorted((a, b)))
    exact = Fraction(cents, 100) * microseconds(end - start) / microseconds(APR_1 - MAR_1)
    assert round_money(prorate(amount, start, end, MAR_1, APR_1), "USD") == exact_half_up(exact, 2)
    assert D(0) <= exact - Fraction(prorate(amount, start, end, MAR_1, APR_1)) < Fraction(1, 10**30)


def test_exact_half_up_reference_itself():
    assert exact_half_up(Fraction(1, 200), 2) == D("0.01")
    assert exact_half_up(Fraction(49, 10000), 2) == D("0.00")
    assert exact_half_up(Fraction(-1, 200), 2) == D("-0.01")


def test_segments_intersect_subscriptions_with_the_period():
    subs = [
        Subscription("growth", MAR_16, None),
        Subscription("starter", datetime(2026, 1, 5, tzinfo=UTC), MAR_16),
        Subscription("old", datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 5, tzinfo=UTC)),
        Subscription("later", APR_1, None),  # starts exactly at the period end: empty, skipped
    ]
    assert segments(subs, MAR_1, APR_1) == [
        Segment("starter", MAR_1, MAR_16),
        Segment("growth", MAR_16, APR_1),
    ]
    assert segments(subs, MAR_1, APR_1)[1].subscription is subs[0]


def test_segments_refuse_overlapping_subscriptions():
    subs = [Subscription("a", MAR_1, MAR_16 + timedelta(microseconds=1)), Subscription("b", MAR_16, None)]
    with pytest.raises(ValueError, match="overlap"):
        segments(subs, MAR_1, APR_1)


def test_segments_convert_other_zones_to_utc():
    tokyo = timezone(timedelta(hours=9))
    subs = [Subscription("jp_pro", datetime(2026, 3, 16, 9, 0, tzinfo=tokyo))]
    (segment,) = segments(subs, MAR_1, APR_1)
    assert segment.start == MAR_16 and segment.start.tzinfo is UTC
