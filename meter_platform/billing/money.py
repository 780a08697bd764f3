"""Money: ISO 4217 minor units, half-up rounding to them, and decimal strings without exponents.

Amounts are ``decimal.Decimal`` end to end; a float never touches money (0.1 has no exact binary form).
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_UP, Context, Decimal, DivisionByZero, InvalidOperation, Overflow

#: Decimal places of each currency's minor unit (ISO 4217). The minor unit decides where an invoice
#: line is rounded: cents for USD, whole yen for JPY, fils (1/1000) for BHD.
MINOR_UNITS: dict[str, int] = {
    code: places
    for codes, places in (
        # Two decimals, the common case.
        (
            """USD EUR GBP CHF CAD AUD NZD INR BRL CNY SEK NOK DKK PLN MXN SGD HKD ZAR CZK HUF RON BGN TRY ILS
            AED SAR QAR THB MYR IDR PHP TWD ARS COP PEN EGP NGN KES PKR BDT UAH MAD LKR GHS RSD KZT GEL UYU
            DOP CRC BOB TTD JMD MUR NPR MOP RUB AZN AMD""",
            2,
        ),
        # No minor unit in use: amounts are whole.
        ("JPY KRW CLP ISK VND PYG UGX RWF XAF XOF XPF KMF GNF DJF VUV BIF", 0),
        # Thousandths.
        ("BHD KWD JOD OMR TND LYD IQD", 3),
        # Unidad de Fomento: an accounting unit with four decimals.
        ("CLF", 4),
    )
    for code in codes.split()
}

#: Arithmetic context for precise (unrounded) amounts. 100 significant digits keep products and sums of
#: realistic prices and quantities exact. Division (proration) truncates toward zero: a value truncated
#: on a grid finer than the minor unit still rounds half-up to the same cent as the exact value, which a
#: round-to-nearest intermediate step would not guarantee (x.xx4999… could become x.xx5).
EXACT = Context(prec=100, rounding=ROUND_DOWN, traps=[InvalidOperation, DivisionByZero, Overflow])


def parse_decimal(raw: object) -> Decimal:
    """A finite Decimal from a configuration value: a decimal string (``"0.008"``) or an integer.

    Raises ValueError for anything else, and for a float in particular: a YAML ``0.1`` is a binary float
    that is not exactly 0.1, so it must be quoted to reach us as the decimal the user wrote.
    """
    if isinstance(raw, float):
        raise ValueError(
            f'{raw!r} is a YAML float, which is inexact (0.1 is not 0.1 in binary); quote it: "{raw!r}".'
        )
    if isinstance(raw, int) and not isinstance(raw, bool):
        return Decimal(raw)
    if isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            value = Decimal("NaN")
        if value.is_finite():
            return value
    raise ValueError(f'{raw!r} is not a number; write a decimal string such as "0.25" or an integer.')


def minor_unit(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit (``USD`` 2, ``JPY`` 0, ``BHD`` 3).

    Raises ValueError for a code that is not in :data:`MINOR_UNITS`.
    """
    try:
        return MINOR_UNITS[currency]
    except KeyError:
        raise ValueError(
            f"unknown currency {currency!r}: use an upper-case ISO 4217 code such as USD, EUR or JPY"
        ) from None


def quantum(currency: str) -> Decimal:
    """The smallest amount of ``currency``: ``Decimal("0.01")`` for USD, ``Decimal("1")`` for JPY."""
    return Decimal(1).scaleb(-minor_unit(currency))


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round ``amount`` half-up (ties away from zero) to ``currency``'s minor unit.

    ``round_money(Decimal("28"), "USD") == Decimal("28.00")`` with the exponent of cents, so the result
    prints as ``28.00``. Negative zero becomes zero so that a credit of nothing never reads ``-0.00``.
    """
    if not isinstance(amount, Decimal):
        raise TypeError(f"money must be a Decimal, not {type(amount).__name__}")
    rounded = amount.quantize(quantum(currency), rounding=ROUND_HALF_UP, context=EXACT)
    return rounded.copy_abs() if rounded.is_zero() else rounded


def is_rounded(amount: Decimal, currency: str) -> bool:
    """True when ``amount`` has no more decimals than ``currency``'s minor unit allows."""
    return amount == amount.quantize(quantum(currency), rounding=ROUND_DOWN, context=EXACT)


def decimal_str(value: Decimal) -> str:
    """``value`` as a plain decimal string, never in exponent notation (``1E+3`` → ``1000``)."""
    text = format(value, "f")
    # Decimal("-0") formats as "-0"; nobody should read a negative nothing.
    return text[1:] if value.is_zero() and text.startswith("-") else text


def format_money(amount: Decimal, currency: str) -> str:
    """``amount`` rounded to ``currency``'s minor unit as a plain string: ``28.00``, ``1200`` (JPY)."""
    return decimal_str(round_money(amount, currency))
