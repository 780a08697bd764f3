"""Money rounds half-up to each currency's minor unit and prints without exponents."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from meter_platform.billing.money import (
    MINOR_UNITS,
    decimal_str,
    format_money,
    is_rounded,
    minor_unit,
    parse_decimal,
    round_money,
)


def test_the_common_currencies_have_their_iso_minor_units():
    two = ("USD", "EUR", "GBP", "CHF", "CAD", "AUD", "INR", "BRL", "CNY", "SEK", "NOK", "DKK", "PLN", "MXN")
    for code in (*two, "SGD", "HKD", "NZD", "ZAR"):
        assert minor_unit(code) == 2, code
    for code in ("JPY", "KRW"):
        assert minor_unit(code) == 0
    for code in ("BHD", "KWD", "JOD"):
        assert minor_unit(code) == 3
    assert len(MINOR_UNITS) >= 40


def test_an_unknown_currency_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"unknown currency 'usd'.*ISO 4217"):
        minor_unit("usd")


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.005", "USD", "0.01"),  # a tie goes up (banker's rounding would give 0.00)
        ("0.0049", "USD", "0.00"),
        ("0.015", "USD", "0.02"),  # half-even would also give 0.02; with 0.005 it shows half-up
        ("2.675", "USD", "2.68"),  # as a float 2.675 is 2.67499…; as a Decimal it is a tie
        ("28", "USD", "28.00"),  # quantized to cents, so it prints as 28.00
        ("-0.005", "USD", "-0.01"),  # ties go away from zero for credits too
        ("-0.004", "USD", "0.00"),  # never "-0.00"
        ("0.5", "JPY", "1"),
        ("1.4999", "JPY", "1"),
        ("1199.5", "JPY", "1200"),
        ("0.0005", "BHD", "0.001"),
        ("1.2345", "BHD", "1.235"),
        ("1.23449", "BHD", "1.234"),
    ],
)
def test_round_money_is_half_up_to_the_minor_unit(amount: str, currency: str, expected: str):
    rounded = round_money(D(amount), currency)
    assert str(rounded) == expected
    assert decimal_str(rounded) == expected


def test_round_money_refuses_floats():
    with pytest.raises(TypeError, match="Decimal"):
        round_money(0.1, "USD")  # type: ignore[arg-type]


def test_format_money_never_uses_exponent_notation():
    assert format_money(D("1.2E+3"), "JPY") == "1200"
    assert format_money(D("1E+3"), "USD") == "1000.00"
    assert format_money(D("0E-10"), "USD") == "0.00"
    assert decimal_str(D("3.5E-10")) == "0.00000000035"
    assert decimal_str(D("-0")) == "0"


def test_is_rounded_checks_the_minor_unit():
    assert is_rounded(D("1.10"), "USD")
    assert is_rounded(D("1.1"), "USD")
    assert not is_rounded(D("1.105"), "USD")
    assert not is_rounded(D("100.5"), "JPY")
    assert is_rounded(D("100.500"), "BHD")


@pytest.mark.parametrize(
    ("raw", "expected"), [("0.1", D("0.1")), (" 2.50 ", D("2.50")), (100, D(100)), ("1e3", D("1000"))]
)
def test_parse_decimal_takes_strings_and_integers(raw: object, expected: D):
    assert parse_decimal(raw) == expected


@pytest.mark.parametrize("raw", [True, None, "abc", "NaN", "Infinity", [1], "1,5"])
def test_parse_decimal_refuses_what_is_not_a_number(raw: object):
    with pytest.raises(ValueError, match="not a number"):
        parse_decimal(raw)


def test_parse_decimal_refuses_floats_and_says_to_quote_them():
    with pytest.raises(ValueError, match=r'YAML float.*quote it: "0.1"'):
        parse_decimal(0.1)
