"""Every pricing model on worked examples at its edges, and tiered models against a plain reference."""

# Descriptions use the multiplication sign (U+00D7) and minus sign (U+2212) on purpose.
# ruff: noqa: RUF001, RUF003

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter_platform.billing.pricing import price
from meter_platform.catalog.plans import Charge, Tier

# The volume charge of the brief: (0, 1000] at 0.01; beyond at 0.008 plus 2.00 flat.
VOLUME = Charge(
    meter="api_calls",
    model="volume",
    tiers=(Tier(D(1000), D("0.01")), Tier(None, D("0.008"), D("2.00"))),
)
# Graduated: (0, 1000] at 0.01 + 5.00 flat; (1000, 5000] at 0.008 + 1.00 flat; beyond at 0.005.
GRADUATED = Charge(
    meter="api_calls",
    model="graduated",
    tiers=(
        Tier(D(1000), D("0.01"), D("5.00")),
        Tier(D(5000), D("0.008"), D("1.00")),
        Tier(None, D("0.005")),
    ),
)
PACKAGE = Charge(
    meter="bytes_transferred",
    model="package",
    package_size=D(1_000_000),
    package_price=D("0.50"),
    free_units=D(2_000_000),
)
PER_UNIT = Charge(meter="tokens", model="per_unit", unit_price=D("0.00015"))
PERCENTAGE = Charge(meter="payment_volume", model="percentage", rate=D("2.9"), fixed_fee=D("0.30"))


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("0", "0"),  # zero is in the first tier: 0 × 0.01, no flat fee there
        ("999.5", "9.995"),  # 999.5 × 0.01
        ("1000", "10.00"),  # up_to is inclusive: 1000 × 0.01
        ("1001", "10.008"),  # every unit at tier 2: 1001 × 0.008 + 2.00
        ("1500", "14.000"),  # 1500 × 0.008 + 2.00
    ],
)
def test_volume_prices_every_unit_at_the_tier_of_the_total(quantity: str, expected: str):
    priced = price(VOLUME, D(quantity))
    assert priced.precise_amount == D(expected)
    assert len(priced.tiers) == 1


def test_volume_description_lets_finance_recompute_the_line():
    priced = price(VOLUME, D(1500))
    assert priced.description() == "1,500 api_calls: 1,500 × 0.008 (tier 2, volume) + 2.00 flat"
    (tier,) = priced.tiers
    assert (tier.index, tier.from_, tier.up_to, tier.units) == (2, D(1000), None, D(1500))
    assert (tier.unit_price, tier.flat_fee, tier.amount) == (D("0.008"), D("2.00"), D("14.000"))


@pytest.mark.parametrize(
    ("quantity", "expected", "tiers_used"),
    [
        ("0", "5.00", 1),  # the first tier's flat fee is due even at zero
        ("1", "5.01", 1),  # 1 × 0.01 + 5.00
        ("1000", "15.00", 1),  # 1000 × 0.01 + 5.00; tier 2 not entered yet
        ("1000.5", "16.004", 2),  # 15.00 + 0.5 × 0.008 + 1.00
        ("1001", "16.008", 2),  # 15.00 + 1 × 0.008 + 1.00
        ("5000", "48.000", 2),  # 15.00 + 4000 × 0.008 + 1.00
        ("5001", "48.005", 3),  # 48.00 + 1 × 0.005
    ],
)
def test_graduated_prices_each_unit_in_its_own_tier(quantity: str, expected: str, tiers_used: int):
    priced = price(GRADUATED, D(quantity))
    assert priced.precise_amount == D(expected)
    assert len(priced.tiers) == tiers_used
    assert sum(t.units for t in priced.tiers) == D(quantity)


def test_graduated_tier_breakdown_and_description():
    priced = price(GRADUATED, D("1000.5"))
    assert [(t.index, t.from_, t.up_to, t.units, t.amount) for t in priced.tiers] == [
        (1, D(0), D(1000), D(1000), D("15.00")),
        (2, D(1000), D(5000), D("0.5"), D("1.004")),
    ]
    assert priced.description() == (
        "1,000.5 api_calls, graduated: tier 1: 1,000 × 0.01 + 5.00 flat; tier 2: 0.5 × 0.008 + 1.00 flat"
    )


@pytest.mark.parametrize(
    ("quantity", "packages"),
    [
        (0, 0),
        (2_000_000, 0),  # all free
        (2_000_001, 1),  # one unit past the free units starts a package
        (3_000_000, 1),  # exactly one package
        (3_000_001, 2),
    ],
)
def test_package_counts_started_packages_after_free_units(quantity: int, packages: int):
    priced = price(PACKAGE, D(quantity))
    assert priced.precise_amount == packages * D("0.50")
    assert priced.billable == max(0, quantity - 2_000_000)


def test_package_without_free_units_at_its_edges():
    charge = Charge(meter="m", model="package", package_size=D(100), package_price=D("3.00"))
    assert price(charge, D(0)).precise_amount == D(0)
    assert price(charge, D("0.5")).precise_amount == D("3.00")  # a started package is a whole one
    assert price(charge, D(100)).precise_amount == D("3.00")
    assert price(charge, D(101)).precise_amount == D("6.00")
    assert price(charge, D(101)).description() == "101 m: 2 packages of 100 × 3.00"


def test_package_count_is_exact_for_huge_quantities():
    charge = Charge(meter="m", model="package", package_size=D(3), package_price=D(1))
    # 10**40 + 1 = 3 × 3333…3 + 2: one more package; a 28-digit division would lose the remainder.
    assert price(charge, D(10**40 + 1)).precise_amount == D((10**40 - 1) // 3 + 1)


def test_per_unit_with_free_units():
    assert price(PER_UNIT, D(12345)).precise_amount == D("1.85175")  # 12345 × 0.00015
    charge = Charge(meter="tokens", model="per_unit", unit_price=D("0.00015"), free_units=D(10000))
    priced = price(charge, D(12345))
    assert priced.billable == D(2345)
    assert priced.precise_amount == D("0.35175")  # 2345 × 0.00015
    assert priced.description() == "12,345 tokens − 10,000 free = 2,345: 2,345 × 0.00015"
    assert price(charge, D(9999)).precise_amount == 0


def test_free_units_come_off_before_the_tiers():
    charge = Charge(meter="api_calls", model="volume", tiers=VOLUME.tiers, free_units=D(500))
    # 1400 − 500 = 900 billable: tier 1, 900 × 0.01
    assert price(charge, D(1400)).precise_amount == D("9.00")
    # 1501 − 500 = 1001 billable: tier 2, 1001 × 0.008 + 2.00
    assert price(charge, D(1501)).precise_amount == D("10.008")


def test_percentage_adds_a_fixed_fee_per_event():
    priced = price(PERCENTAGE, D("1000.00"), events=10)
    assert priced.precise_amount == D("32.00")  # 1000.00 × 2.9 / 100 + 10 × 0.30
    priced = price(PERCENTAGE, D("123.45"), events=3)
    assert priced.precise_amount == D("4.48005")  # 3.58005 + 0.90
    assert priced.description() == "123.45 payment_volume: 123.45 × 2.9% + 3 events × 0.30"
    assert price(PERCENTAGE, D(0), events=0).precise_amount == 0


def test_negative_net_usage_bills_nothing():
    assert price(PER_UNIT, D(-5)).precise_amount == 0
    assert price(GRADUATED, D(-5)).precise_amount == D("5.00")  # only the first tier's flat fee


def test_price_refuses_floats_and_negative_event_counts():
    with pytest.raises(TypeError):
        price(PER_UNIT, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        price(PERCENTAGE, D(1), events=-1)


# --- Property tests: tiered models against an obviously correct, unit-by-unit reference. ---


@st.composite
def tier_lists(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(draw(st.sets(st.integers(1, 300), min_size=0, max_size=4)))
    money = st.integers(0, 5000).map(lambda cents: D(cents) / 1000)  # 0.000 … 5.000
    tiers = [Tier(D(b), draw(money), draw(money)) for b in bounds]
    return (*tiers, Tier(None, draw(money), draw(money)))


def tier_of_unit(tiers: tuple[Tier, ...], unit: int) -> int:
    """The index of the tier that unit number ``unit`` (1, 2, …) falls in: (previous up_to, up_to]."""
    return next(i for i, t in enumerate(tiers) if t.up_to is None or unit <= t.up_to)


def reference_graduated(tiers: tuple[Tier, ...], quantity: int) -> D:
    total = D(0)
    for unit in range(1, quantity + 1):
        total += tiers[tier_of_unit(tiers, unit)].unit_price
    # Flat fees of every tier entered; the first tier is entered even at zero.
    highest = tier_of_unit(tiers, max(quantity, 1))
    return total + sum((t.flat_fee for t in tiers[: highest + 1]), D(0))


def reference_volume(tiers: tuple[Tier, ...], quantity: int) -> D:
    tier = tiers[tier_of_unit(tiers, max(quantity, 1))]  # zero is in the first tier
    return quantity * tier.unit_price + tier.flat_fee


@settings(max_examples=300, deadline=None)
@given(tiers=tier_lists(), quantity=st.integers(0, 400))
def test_graduated_matches_the_unit_by_unit_reference(tiers: tuple[Tier, ...], quantity: int):
    charge = Charge(meter="m", model="graduated", tiers=tiers)
    priced = price(charge, D(quantity))
    assert priced.precise_amount == reference_graduated(tiers, quantity)
    assert sum(t.units for t in priced.tiers) == quantity


@settings(max_examples=300, deadline=None)
@given(tiers=tier_lists(), quantity=st.integers(0, 400))
def test_volume_matches_the_reference(tiers: tuple[Tier, ...], quantity: int):
    charge = Charge(meter="m", model="volume", tiers=tiers)
    assert price(charge, D(quantity)).precise_amount == reference_volume(tiers, quantity)


@settings(max_examples=200, deadline=None)
@given(tiers=tier_lists(), free=st.integers(0, 50), quantity=st.integers(0, 400))
def test_free_units_are_the_same_as_less_usage(tiers: tuple[Tier, ...], free: int, quantity: int):
    for model in ("graduated", "volume"):
        with_free = Charge(meter="m", model=model, tiers=tiers, free_units=D(free))
        plain = Charge(meter="m", model=model, tiers=tiers)
        expected = price(plain, D(max(0, quantity - free))).precise_amount
        assert price(with_free, D(quantity)).precise_amount == expected


@settings(max_examples=200, deadline=None)
@given(tiers=tier_lists(), tenths=st.integers(0, 4000))
def test_graduated_never_decreases_with_usage(tiers: tuple[Tier, ...], tenths: int):
    charge = Charge(meter="m", model="graduated", tiers=tiers)
    q = D(tenths) / 10
    assert price(charge, q + D("0.1")).precise_amount >= price(charge, q).precise_amount
