"""The user's plans (``plans.yaml``, beside ``meters.yaml``): what each meter costs, per plan.

Loaded and checked once, like the meter catalog: every mistake in the file is collected and reported in
one :class:`PlanError`, each with its place and what to do, so a user fixes the file in one pass.
Prices are read as decimal strings or integers; a YAML float is refused because ``0.1`` as a float is
not 0.1, and an invoice must add up to the cent. The tiers of graduated and volume charges are
parsed in :mod:`.plan_tiers`, the values in :mod:`.plan_values`; ``Tier`` and ``TIER_KEYS`` are
exported from here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import yaml

from meter_platform.billing.money import MINOR_UNITS, is_rounded
from meter_platform.catalog.plan_tiers import TIER_KEYS as TIER_KEYS
from meter_platform.catalog.plan_tiers import Tier, _parse_tiers
from meter_platform.catalog.plan_values import _ZERO, _as_json, _AsJson, _check_keys, _number

MODELS = ("per_unit", "graduated", "volume", "package", "percentage")
#: Keys every charge may have, whatever its model.
COMMON_CHARGE_KEYS = ("meter", "model", "free_units", "group_by")
#: Keys each model takes beyond the common ones, and which of them it cannot do without.
MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "per_unit": ("unit_price",),
    "graduated": ("tiers",),
    "volume": ("tiers",),
    "package": ("package_size", "package_price"),
    "percentage": ("rate", "fixed_fee"),
}
ALL_MODEL_KEYS = tuple(dict.fromkeys(k for keys in MODEL_KEYS.values() for k in keys))
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {**MODEL_KEYS, "percentage": ("rate",)}
PLAN_KEYS = ("key", "name", "currency", "base_fee", "minimum", "thresholds", "charges")
THRESHOLD_KEYS = ("meter", "quantity", "amount")
_PLAN_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class PlanError(ValueError):
    """The plans cannot be used; the message lists every problem found (also in :attr:`problems`)."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


class MeterInfo(Protocol):
    """What plans need to know of a meter; the catalog's ``Meter`` dataclass satisfies it."""

    @property
    def slug(self) -> str: ...

    @property
    def group_by(self) -> tuple[str, ...]: ...

    @property
    def aggregation(self) -> str: ...


@dataclass(frozen=True)
class Charge(_AsJson):
    """How one meter's value over a service period becomes money; see :mod:`.pricing`."""

    meter: str
    model: str
    unit_price: Decimal | None = None
    tiers: tuple[Tier, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal | None = None
    free_units: Decimal = _ZERO
    rate: Decimal | None = None
    fixed_fee: Decimal = _ZERO
    group_by: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The charge with decimal strings, showing only the fields of its model."""
        foreign = set(ALL_MODEL_KEYS) - set(MODEL_KEYS[self.model])
        return {k: v for k, v in _as_json(self).items() if k not in foreign}


@dataclass(frozen=True)
class Threshold(_AsJson):
    """An alert level: a meter's ``quantity``, or an ``amount`` billed (for one meter, or in total)."""

    meter: str | None = None
    quantity: Decimal | None = None
    amount: Decimal | None = None


@dataclass(frozen=True)
class Plan(_AsJson):
    """A plan: currency, optional base fee and minimum commitment per period, and its charges."""

    key: str
    name: str
    currency: str
    base_fee: Decimal | None = None
    minimum: Decimal | None = None
    charges: tuple[Charge, ...] = ()
    thresholds: tuple[Threshold, ...] = ()

    def charge(self, meter: str) -> Charge | None:
        """The plan's charge for ``meter`` (a plan charges each meter at most once), or None."""
        return next((c for c in self.charges if c.meter == meter), None)


def _money_field(
    raw: Mapping[str, Any], key: str, where: str, currency: str | None, errors: list[str]
) -> Decimal | None:
    """An optional amount (base fee, minimum, threshold): no more decimals than the currency has."""
    if raw.get(key) is None:
        return None
    value = _number(raw[key], where, key, errors)
    if value is not None and currency is not None and not is_rounded(value, currency):
        errors.append(
            f"{where}: {key} {raw[key]!r} has more decimals than {currency} allows "
            f"({MINOR_UNITS[currency]}); round it."
        )
    return value


def _parse_group_by(raw: Any, meter: MeterInfo | None, where: str, errors: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        errors.append(f"{where}: group_by must be a list of the meter's dimensions, e.g. [region].")
        return ()
    if len(set(raw)) != len(raw):
        errors.append(f"{where}: group_by names a dimension twice.")
    for g in raw:
        if meter is not None and g not in meter.group_by:
            errors.append(
                f"{where}: group_by {g!r} is not a dimension of meter {meter.slug!r} "
                f"(its group_by: {', '.join(meter.group_by) or 'none'}); use one of those."
            )
    return tuple(raw)


def _parse_model_fields(raw: Mapping[str, Any], model: str, where: str, errors: list[str]) -> dict[str, Any]:
    """The model-specific fields of a charge, after reporting missing and foreign ones."""
    for key in REQUIRED_KEYS[model]:
        if raw.get(key) is None:
            errors.append(f"{where}: a {model} charge needs {key}.")
    for key in ALL_MODEL_KEYS:
        if key in raw and key not in MODEL_KEYS[model]:
            errors.append(
                f"{where}: {key} does not belong to a {model} charge "
                f"({model} takes {', '.join(MODEL_KEYS[model])}); remove it or change the model."
            )
    out: dict[str, Any] = {}
    for key in MODEL_KEYS[model]:
        if raw.get(key) is None:
            continue
        if key == "tiers":
            out["tiers"] = _parse_tiers(raw["tiers"], where, errors)
        else:
            out[key] = _number(raw[key], where, key, errors, positive=key == "package_size")
    return out


def _parse_charge(raw: Any, where: str, meters: Mapping[str, MeterInfo], errors: list[str]) -> Charge | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: a charge must be a mapping with meter, model and the model's prices.")
        return None
    before = len(errors)
    model = raw.get("model")
    _check_keys(raw, where, COMMON_CHARGE_KEYS + ALL_MODEL_KEYS, errors)
    slug = raw.get("meter")
    meter = meters.get(slug) if isinstance(slug, str) else None
    if meter is None:
        errors.append(
            f"{where}: unknown meter {slug!r}; known meters: {', '.join(sorted(meters)) or 'none'}."
        )
    model_fields: dict[str, Any] = {}
    if model not in MODELS:
        errors.append(f"{where}: model {model!r} is not one of {', '.join(MODELS)}.")
    else:
        model_fields = _parse_model_fields(raw, model, where, errors)
        if model == "percentage" and meter is not None and meter.aggregation != "sum":
            errors.append(
                f"{where}: a percentage charge needs a sum meter (a percentage of a summed value); "
                f"{meter.slug!r} aggregates by {meter.aggregation}."
            )
    free = _number(raw.get("free_units", 0), where, "free_units", errors)
    group_by = _parse_group_by(raw.get("group_by"), meter, where, errors)
    if len(errors) > before:
        return None
    fixed_fee = model_fields.pop("fixed_fee", None)
    return Charge(
        meter=str(slug),
        model=str(model),
        free_units=free or _ZERO,
        fixed_fee=fixed_fee or _ZERO,
        group_by=group_by,
        **model_fields,
    )


def _parse_threshold(
    raw: Any, where: str, charged: tuple[str, ...], currency: str | None, errors: list[str]
) -> Threshold | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: a threshold must be a mapping: {{meter, quantity}} or {{amount}}.")
        return None
    before = len(errors)
    _check_keys(raw, where, THRESHOLD_KEYS, errors)
    meter = raw.get("meter")
    if meter is not None and meter not in charged:
        errors.append(
            f"{where}: threshold meter {meter!r} is not charged by this plan "
            f"(charged: {', '.join(charged) or 'none'}); add a charge for it or remove the threshold."
        )
    has_quantity, has_amount = raw.get("quantity") is not None, raw.get("amount") is not None
    if has_quantity == has_amount:
        errors.append(f"{where}: a threshold takes exactly one of quantity (with a meter) and amount.")
    elif has_quantity and meter is None:
        errors.append(f"{where}: a quantity threshold needs the meter it counts.")
    quantity = _number(raw["quantity"], where, "quantity", errors, positive=True) if has_quantity else None
    amount = _money_field(raw, "amount", where, currency, errors)
    if amount is not None and amount == 0:
        errors.append(f"{where}: amount must be greater than 0.")
    if len(errors) > before:
        return None
    return Threshold(meter=meter, quantity=quantity, amount=amount)


def _parse_currency(raw: Any, where: str, errors: list[str]) -> str | None:
    if isinstance(raw, str) and raw in MINOR_UNITS:
        return raw
    hint = "use an ISO 4217 code such as USD, EUR or JPY"
    if isinstance(raw, str) and raw.upper() in MINOR_UNITS:
        hint = f"write it upper-case: {raw.upper()!r}"
    errors.append(f"{where}: unknown currency {raw!r}; {hint}.")
    return None


def _parse_list(raw: Mapping[str, Any], key: str, where: str, errors: list[str]) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append(f"{where}: {key} must be a list.")
        return []
    return value


def _parse_plan(
    i: int, raw: Any, meters: Mapping[str, MeterInfo], source: str, errors: list[str]
) -> Plan | None:
    if not isinstance(raw, dict):
        errors.append(f"{source}: plans[{i}] must be a mapping with key, name, currency and charges.")
        return None
    key = raw.get("key")
    where = f"{source}: plans[{i}] ({key})" if isinstance(key, str) else f"{source}: plans[{i}]"
    before = len(errors)
    _check_keys(raw, where, PLAN_KEYS, errors)
    if not isinstance(key, str) or not _PLAN_KEY.match(key):
        errors.append(
            f"{where}: key {key!r} must be 1 to 64 lower-case letters, digits, _ or -, starting with a letter."
        )
    name = raw.get("name", key)
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: name must be a non-empty string.")
    currency = _parse_currency(raw.get("currency"), where, errors)
    base_fee = _money_field(raw, "base_fee", where, currency, errors)
    minimum = _money_field(raw, "minimum", where, currency, errors)
    raw_charges = _parse_list(raw, "charges", where, errors)
    charges = [_parse_charge(c, f"{where} charges[{j}]", meters, errors) for j, c in enumerate(raw_charges)]
    # The meters as written, so a charge with another mistake still counts for these two checks.
    named: list[str] = [
        c["meter"] for c in raw_charges if isinstance(c, dict) and isinstance(c.get("meter"), str)
    ]
    for slug in sorted({m for m in named if named.count(m) > 1}):
        errors.append(f"{where}: meter {slug!r} is charged more than once; merge its charges into one.")
    charged = tuple(dict.fromkeys(named))
    thresholds = [
        _parse_threshold(t, f"{where} thresholds[{j}]", charged, currency, errors)
        for j, t in enumerate(_parse_list(raw, "thresholds", where, errors))
    ]
    if len(errors) > before:
        return None
    return Plan(
        key=str(key),
        name=str(name),
        currency=str(currency),
        base_fee=base_fee,
        minimum=minimum,
        charges=tuple(c for c in charges if c is not None),
        thresholds=tuple(t for t in thresholds if t is not None),
    )


def parse_plans(data: Any, meters: Mapping[str, MeterInfo], source: str = "plans.yaml") -> dict[str, Plan]:
    """Check the parsed YAML of a plans file against ``meters`` (by slug) and return the plans by key.

    Raises PlanError listing every problem in the file, each prefixed with ``source`` and its place.
    """
    if data is None:
        return {}
    errors: list[str] = []
    raw_plans: list[Any] = []
    if not isinstance(data, dict):
        errors.append(f"{source}: the file must hold a mapping with a `plans` list.")
    else:
        _check_keys(data, source, ("plans",), errors)
        raw_plans = _parse_list(data, "plans", source, errors)
    plans = [_parse_plan(i, raw, meters, source, errors) for i, raw in enumerate(raw_plans)]
    keys = [raw.get("key") if isinstance(raw, dict) else None for raw in raw_plans]
    for key in dict.fromkeys(k for k in keys if isinstance(k, str) and keys.count(k) > 1):
        places = " and ".join(f"plans[{i}]" for i, k in enumerate(keys) if k == key)
        errors.append(f"{source}: {places} use the same key {key!r}; plan keys must be unique.")
    if errors:
        raise PlanError(
            f"{source} has {len(errors)} problem(s):\n  - " + "\n  - ".join(errors), tuple(errors)
        )
    return {p.key: p for p in plans if p is not None}


def load_plans(path: Path, meters: Mapping[str, MeterInfo]) -> dict[str, Plan]:
    """Load and check the plans file at ``path``; a missing file means no plans (an empty dict).

    Raises PlanError for invalid YAML or any problem in the plans.
    """
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PlanError(f"{path.name} is not valid YAML: {exc}") from exc
    return parse_plans(data, meters, source=path.name)
