"""Invoice lines: prorated base fees, usage per group, minimum commitments, adjustments, totals."""

# Descriptions use the multiplication sign (U+00D7) and minus sign (U+2212) on purpose.
# ruff: noqa: RUF001, RUF003

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import pytest

from meter_platform.billing.invoice import Line, adjustment_lines, build_lines, totals
from meter_platform.billing.periods import Subscription, period_bounds, segments
from meter_platform.catalog.plans import Charge, Plan, Tier

MAR_1, APR_1 = period_bounds("2026-03")  # 31 days: 2,678,400 s
MAR_16 = datetime(2026, 3, 16, tzinfo=UTC)
CALLS = Charge(meter="api_calls", model="per_unit", unit_price=D("0.01"))
GROWTH = Plan(
    key="growth", name="Growth", currency="USD", base_fee=D("100.00"), minimum=D("150.00"), charges=(CALLS,)
)
STARTER = Plan(
    key="starter",
    name="Starter",
    currency="USD",
    base_fee=D("31.00"),
    charges=(Charge(meter="api_calls", model="per_unit", unit_price=D("0.02")),),
)

Usage = list[tuple[dict[str, Any] | None, D, int]]


def flat(quantity: int | str, events: int = 0):
    """A usage function giving every charge the same ungrouped quantity."""
    return lambda charge: [(None, D(quantity), events)]


def amounts(lines: list[Line]) -> list[tuple[str, D]]:
    return [(line.type, line.amount) for line in lines]


def test_whole_month_above_the_minimum_has_no_minimum_line():
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(6000))
    assert amounts(lines) == [("base_fee", D("100.00")), ("usage", D("60.00"))]  # 6000 × 0.01
    assert totals(lines, "USD") == (D("160.00"), D("160.00"))


def test_exactly_at_the_minimum_has_no_minimum_line():
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(5000))
    assert amounts(lines) == [("base_fee", D("100.00")), ("usage", D("50.00"))]


def test_a_shortfall_adds_a_minimum_line_for_the_difference():
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(1000))
    # 100.00 base + 10.00 usage = 110.00 < 150.00: a minimum line of 40.00
    assert amounts(lines) == [("base_fee", D("100.00")), ("usage", D("10.00")), ("minimum", D("40.00"))]
    assert lines[2].description == "Growth minimum commitment 150.00 USD = 150.00, less 110.00 billed"
    assert totals(lines, "USD") == (D("150.00"), D("150.00"))


def test_the_minimum_line_at_the_edge_of_the_prorated_commitment():
    # From Mar 16 the commitment is 150.00 × 16/31 = 77.41935…; the base fee is 51.61.
    # 2580 calls: 51.61 + 25.80 = 77.41 billed, 0.00935… short → a 0.01 minimum line.
    lines = build_lines(GROWTH, MAR_16, APR_1, MAR_1, APR_1, flat(2580))
    assert amounts(lines)[-1] == ("minimum", D("0.01"))
    assert lines[-1].precise_amount == D("0.009354838709677419354838709677")
    # 2581 calls: 77.42 billed, already above 77.41935…: no minimum line.
    lines = build_lines(GROWTH, MAR_16, APR_1, MAR_1, APR_1, flat(2581))
    assert [line.type for line in lines] == ["base_fee", "usage"]
    # A whole month 0.50 short: 100.00 + 49.50 billed.
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(4950))
    assert amounts(lines)[-1] == ("minimum", D("0.50"))
    # 0.50 above it: a minimum never credits the excess back.
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(5050))
    assert [line.type for line in lines] == ["base_fee", "usage"]


def test_a_mid_month_plan_change_prorates_base_fee_and_minimum_by_the_second():
    subs = [Subscription("starter", datetime(2026, 1, 1, tzinfo=UTC), MAR_16), Subscription("growth", MAR_16)]
    plans = {"starter": STARTER, "growth": GROWTH}
    usage = {"starter": flat(2000), "growth": flat(1000)}
    lines: list[Line] = []
    for seg in segments(subs, MAR_1, APR_1):
        lines += build_lines(plans[seg.plan], seg.start, seg.end, MAR_1, APR_1, usage[seg.plan])
    assert amounts(lines) == [
        ("base_fee", D("15.00")),  # 31.00 × 15/31 days
        ("usage", D("40.00")),  # 2000 × 0.02
        ("base_fee", D("51.61")),  # 100.00 × 16/31 = 51.6129…
        ("usage", D("10.00")),  # 1000 × 0.01
        # 150.00 × 16/31 = 77.41935…; less 51.61 + 10.00 billed = 15.80935… → 15.81
        ("minimum", D("15.81")),
    ]
    base = lines[2]
    assert base.precise_amount == D("51.612903225806451612903225806451")
    assert base.description == "Growth base fee 100.00 USD × 1,382,400 s / 2,678,400 s of the period"
    assert (base.service_period_start, base.service_period_end) == (MAR_16, APR_1)
    assert lines[4].precise_amount == D("15.809354838709677419354838709677")
    assert lines[4].description == (
        "Growth minimum commitment 150.00 USD × 1,382,400 s / 2,678,400 s of the period = 77.42, "
        "less 61.61 billed"
    )
    assert totals(lines, "USD") == (D("132.42"), D("132.42"))


def test_grouped_charges_give_one_line_per_group_in_a_stable_order():
    charge = Charge(
        meter="bytes_transferred", model="per_unit", unit_price=D("0.00015"), group_by=("region",)
    )
    plan = Plan(key="p", name="P", currency="USD", charges=(charge,))
    usage: Usage = [
        ({"region": "us"}, D(1000), 0),
        ({"region": "eu"}, D(12345), 0),
        ({"region": None}, D(10), 0),
    ]
    lines = build_lines(plan, MAR_1, APR_1, MAR_1, APR_1, lambda c: usage)
    assert [(line.group, line.amount, line.precise_amount) for line in lines] == [
        ({"region": None}, D("0.00"), D("0.00150")),  # 10 × 0.00015, no region first
        ({"region": "eu"}, D("1.85"), D("1.85175")),  # 12345 × 0.00015
        ({"region": "us"}, D("0.15"), D("0.15000")),  # 1000 × 0.00015
    ]
    assert lines[1].description == "12,345 bytes_transferred: 12,345 × 0.00015 [region=eu]"


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ([({"region": "eu"}, D(1), 0), ({"region": "eu"}, D(2), 0)], "twice"),
        ([({"country": "JP"}, D(1), 0)], "grouped by exactly"),
        ([(None, D(1), 0), ({"region": "eu"}, D(2), 0)], "grouped by exactly"),
    ],
)
def test_usage_that_does_not_fit_the_grouping_is_refused(usage: Usage, message: str):
    charge = Charge(meter="bytes_transferred", model="per_unit", unit_price=D(1), group_by=("region",))
    plan = Plan(key="p", name="P", currency="USD", charges=(charge,))
    with pytest.raises(ValueError, match=message):
        build_lines(plan, MAR_1, APR_1, MAR_1, APR_1, lambda c: usage)
    with pytest.raises(ValueError, match="no group_by"):
        build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, lambda c: [({"region": "eu"}, D(1), 0)])


def test_no_usage_still_gives_a_line_and_the_first_tiers_flat_fee():
    charge = Charge(
        meter="api_calls", model="graduated", tiers=(Tier(D(10), D(1), D("5.00")), Tier(None, D(0)))
    )
    plan = Plan(key="p", name="P", currency="USD", charges=(charge, CALLS))
    lines = build_lines(plan, MAR_1, APR_1, MAR_1, APR_1, lambda c: [])
    assert [(line.meter, line.quantity, line.amount) for line in lines] == [
        ("api_calls", D(0), D("5.00")),
        ("api_calls", D(0), D("0.00")),
    ]


@pytest.mark.parametrize(
    ("currency", "unit_price", "quantities", "line_amounts", "total"),
    [
        # Three lines of 0.005 each round to 0.01: the total is 0.03, the sum of what is printed,
        # not 0.02 (the rounded precise sum 0.015).
        ("USD", "0.005", [1, 1, 1], ["0.01", "0.01", "0.01"], "0.03"),
        ("USD", "0.0049", [1], ["0.00"], "0.00"),
        ("JPY", "0.5", [1, 3], ["1", "2"], "3"),  # 0.5 → 1 and 1.5 → 2 yen
        ("BHD", "0.0005", [1, 3], ["0.001", "0.002"], "0.003"),  # 0.0005 → 0.001, 0.0015 → 0.002
    ],
)
def test_each_line_is_rounded_half_up_once_and_totals_sum_the_lines(
    currency: str, unit_price: str, quantities: list[int], line_amounts: list[str], total: str
):
    charge = Charge(
        meter="bytes_transferred", model="per_unit", unit_price=D(unit_price), group_by=("region",)
    )
    plan = Plan(key="p", name="P", currency=currency, charges=(charge,))
    usage: Usage = [({"region": f"r{i}"}, D(q), 0) for i, q in enumerate(quantities)]
    lines = build_lines(plan, MAR_1, APR_1, MAR_1, APR_1, lambda c: usage)
    assert [str(line.amount) for line in lines] == line_amounts
    assert [str(t) for t in totals(lines, currency)] == [total, total]


def test_percentage_line_with_fixed_fee_per_event():
    charge = Charge(meter="call_minutes", model="percentage", rate=D("2.9"), fixed_fee=D("0.30"))
    plan = Plan(key="p", name="P", currency="USD", charges=(charge,))
    (line,) = build_lines(plan, MAR_1, APR_1, MAR_1, APR_1, flat("123.45", events=3))
    # 123.45 × 2.9 / 100 = 3.58005; + 3 × 0.30 = 4.48005 → 4.48
    assert (line.amount, line.precise_amount) == (D("4.48"), D("4.48005"))
    assert line.description == "123.45 call_minutes: 123.45 × 2.9% + 3 events × 0.30"


def test_line_as_json_uses_decimal_strings_and_rfc3339_utc():
    charge = Charge(
        meter="api_calls", model="volume", tiers=(Tier(D(1000), D("0.01")), Tier(None, D("0.008")))
    )
    plan = Plan(key="p", name="P", currency="USD", charges=(charge,))
    (line,) = build_lines(plan, MAR_16, APR_1, MAR_1, APR_1, flat(1500))
    assert line.as_json() == {
        "type": "usage",
        "plan": "p",
        "meter": "api_calls",
        "group": None,
        "description": "1,500 api_calls: 1,500 × 0.008 (tier 2, volume)",
        "quantity": "1500",
        "amount": "12.00",
        "precise_amount": "12.000",
        "service_period_start": "2026-03-16T00:00:00.000000Z",
        "service_period_end": "2026-04-01T00:00:00.000000Z",
        "tiers": [
            {
                "index": 2,
                "from": "1000",
                "up_to": None,
                "units": "1500",
                "unit_price": "0.008",
                "flat_fee": "0",
                "amount": "12.000",
            }
        ],
        "adjusts_period": None,
        "events": 0,
    }


def test_adjustment_reprices_the_whole_quantity_and_rounds_the_difference_once():
    volume = Charge(
        meter="api_calls", model="volume", tiers=(Tier(D(1000), D("0.01")), Tier(None, D("0.008")))
    )
    # Billed 1000 (10.00); late events make it 1250: 1250 × 0.008 = 10.00 — the tier change pays for them.
    assert adjustment_lines(GROWTH, volume, D(1000), 0, D(1250), 0, "2026-02") is None
    line = adjustment_lines(GROWTH, CALLS, D(1000), 0, D(1234), 0, "2026-02")
    assert line is not None
    assert (line.type, line.amount, line.precise_amount, line.quantity) == (
        "adjustment",
        D("2.34"),
        D("2.34"),
        D(234),
    )
    assert (line.service_period_start, line.service_period_end) == period_bounds("2026-02")
    assert line.adjusts_period == "2026-02"
    credit = adjustment_lines(GROWTH, CALLS, D(1000), 0, D(900), 0, "2026-02", group=None)
    assert credit is not None and credit.amount == D("-1.00")
    # 0.004 more rounds to nothing: no line; the caller keeps what was billed, so it can accumulate.
    tiny = Charge(meter="api_calls", model="per_unit", unit_price=D("0.001"))
    assert adjustment_lines(GROWTH, tiny, D(4), 0, D(8), 0, "2026-02") is None
    rounded_up = adjustment_lines(GROWTH, tiny, D(4), 0, D(9), 0, "2026-02")
    assert rounded_up is not None and rounded_up.amount == D("0.01")  # 0.005 → 0.01
    with pytest.raises(ValueError, match="YYYY-MM"):
        adjustment_lines(GROWTH, CALLS, D(1), 0, D(2), 0, "Feb 2026")


def test_totals_keep_adjustments_out_of_the_subtotal_and_check_the_currency():
    lines = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(6000))
    credit = adjustment_lines(GROWTH, CALLS, D(1000), 0, D(900), 0, "2026-02")
    assert credit is not None
    assert totals([*lines, credit], "USD") == (D("160.00"), D("159.00"))
    assert totals([], "JPY") == (D(0), D(0))
    cents = build_lines(GROWTH, MAR_1, APR_1, MAR_1, APR_1, flat(6001))  # 60.01 is no whole yen
    with pytest.raises(ValueError, match=r"60\.01 is not in whole minor units of JPY"):
        totals(cents, "JPY")
