"""plans.yaml is checked at load: every mistake is listed at once, with its place and what to do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal as D
from pathlib import Path

import pytest
import yaml

import meter_platform
from meter_platform.catalog.plans import Charge, PlanError, Tier, load_plans, parse_plans

EXAMPLE_DIR = Path(meter_platform.__file__).parent / "example_catalog"


@dataclass(frozen=True)
class FakeMeter:
    """Stands in for ``catalog.Meter``: the three attributes plans look at."""

    slug: str
    aggregation: str
    group_by: tuple[str, ...] = ()


def example_meters() -> dict[str, FakeMeter]:
    raw = yaml.safe_load((EXAMPLE_DIR / "meters.yaml").read_text())
    return {
        m["slug"]: FakeMeter(m["slug"], m["aggregation"], tuple(m.get("group_by") or ()))
        for m in raw["meters"]
    }


METERS = example_meters()


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(PlanError) as info:
        parse_plans(yaml.safe_load(text), METERS)
    return info.value.problems


def test_the_example_plans_load_against_the_example_meters():
    plans = load_plans(EXAMPLE_DIR / "plans.yaml", METERS)
    assert set(plans) == {"starter", "growth", "jp_pro"}
    growth = plans["growth"]
    assert (growth.currency, growth.base_fee, growth.minimum) == ("USD", D("99.00"), D("250.00"))
    assert plans["jp_pro"].currency == "JPY"
    models = {c.model for p in plans.values() for c in p.charges}
    assert models == {"per_unit", "graduated", "volume", "package", "percentage"}
    assert any(c.group_by for c in growth.charges)
    json.dumps([p.as_json() for p in plans.values()])  # JSON-able as it is


BRIEF = """
plans:
  - key: growth
    name: Growth
    currency: USD
    base_fee: "100.00"
    minimum: "150.00"
    thresholds:
      - {meter: api_calls, quantity: 100000}
      - {amount: "500.00"}
    charges:
      - meter: api_calls
        model: volume
        tiers:
          - {up_to: 1000, unit_price: "0.01"}
          - {up_to: null, unit_price: "0.008", flat_fee: "2.00"}
      - meter: bytes_transferred
        model: package
        package_size: 1000000
        package_price: "0.50"
        free_units: 2000000
      - meter: sms_segments
        model: per_unit
        unit_price: "0.00015"
        group_by: [country]
      - meter: call_minutes
        model: percentage
        rate: "2.9"
        fixed_fee: "0.30"
"""


def test_the_brief_example_parses_into_exact_decimals():
    plan = parse_plans(yaml.safe_load(BRIEF), METERS)["growth"]
    assert plan.charge("api_calls") == Charge(
        meter="api_calls",
        model="volume",
        tiers=(Tier(D(1000), D("0.01"), D(0)), Tier(None, D("0.008"), D("2.00"))),
    )
    assert plan.charge("bytes_transferred") == Charge(
        meter="bytes_transferred",
        model="package",
        package_size=D(1000000),
        package_price=D("0.50"),
        free_units=D(2000000),
    )
    sms = plan.charge("sms_segments")
    assert sms is not None and sms.group_by == ("country",)
    assert plan.charge("nope") is None
    as_json = plan.as_json()
    assert as_json["base_fee"] == "100.00"
    assert as_json["charges"][0] == {
        "meter": "api_calls",
        "model": "volume",
        "tiers": [
            {"up_to": "1000", "unit_price": "0.01", "flat_fee": "0"},
            {"up_to": None, "unit_price": "0.008", "flat_fee": "2.00"},
        ],
        "free_units": "0",
        "group_by": [],
    }
    assert as_json["charges"][3] == {
        "meter": "call_minutes",
        "model": "percentage",
        "free_units": "0",
        "rate": "2.9",
        "fixed_fee": "0.30",
        "group_by": [],
    }
    assert as_json["thresholds"] == [
        {"meter": "api_calls", "quantity": "100000", "amount": None},
        {"meter": None, "quantity": None, "amount": "500.00"},
    ]


BAD = """
plans:
  - key: ok
    currency: USD
    charges:
      - {meter: api_calls, model: per_unit, unit_price: "0.01"}
  - key: ok
    currency: USD
  - key: Bad Key
    currency: usd
    base_fee: 0.1
    charges:
      - {meter: api_callz, model: per_unit, unit_price: "0.01"}
      - {meter: api_calls, model: per_unit, unit_price: "0.01", group_by: [country]}
      - {meter: bytes_transferred, model: per_unit}
      - {meter: messages_sent, model: per_unit, unit_price: "-1", package_size: 10, colour: red}
      - {meter: storage_gb_hours, model: package, package_size: 0, package_price: "1"}
      - {meter: analytics_queries, model: percentage, rate: "2"}
      - {meter: rows_scanned, model: stepped}
  - key: tiers
    currency: JPY
    minimum: "100.5"
    charges:
      - meter: api_calls
        model: graduated
        tiers: [{up_to: 100, unit_price: "1"}, {up_to: 50, unit_price: "1"}, {up_to: null, unit_price: "1"}]
      - meter: bytes_transferred
        model: volume
        tiers: [{up_to: null, unit_price: "1"}, {up_to: 10, unit_price: "1"}]
      - meter: messages_sent
        model: volume
        tiers: [{up_to: 10, unit_price: "1"}, {up_to: 10, unit_price: "1"}, {up_to: null, unit_price: "1"}]
      - {meter: messages_sent, model: per_unit, unit_price: "1"}
    thresholds:
      - {meter: api_calls}
      - {meter: api_calls, quantity: 5, amount: "5"}
      - {meter: call_minutes, quantity: 5}
"""


def test_every_mistake_is_listed_at_once_with_its_place_and_what_to_do():
    found = problems(BAD)
    expected = [
        "plans.yaml: plans[2] (Bad Key): key 'Bad Key' must be 1 to 64 lower-case letters",
        "plans.yaml: plans[2] (Bad Key): unknown currency 'usd'; write it upper-case: 'USD'",
        "plans.yaml: plans[2] (Bad Key): base_fee 0.1 is a YAML float, which is inexact (0.1 is not 0.1 "
        'in binary); quote it: "0.1"',
        "plans.yaml: plans[2] (Bad Key) charges[0]: unknown meter 'api_callz'; known meters: "
        "analytics_queries, api_calls, bytes_transferred,",
        "plans.yaml: plans[2] (Bad Key) charges[1]: group_by 'country' is not a dimension of meter "
        "'api_calls' (its group_by: endpoint, method, region)",
        "plans.yaml: plans[2] (Bad Key) charges[2]: a per_unit charge needs unit_price",
        "plans.yaml: plans[2] (Bad Key) charges[3]: package_size does not belong to a per_unit charge",
        "plans.yaml: plans[2] (Bad Key) charges[3]: unit_price '-1' must be at least 0",
        "plans.yaml: plans[2] (Bad Key) charges[3]: unknown key 'colour'; allowed keys: meter, model,",
        "plans.yaml: plans[2] (Bad Key) charges[4]: package_size 0 must be greater than 0",
        "plans.yaml: plans[2] (Bad Key) charges[5]: a percentage charge needs a sum meter",
        "plans.yaml: plans[2] (Bad Key) charges[6]: model 'stepped' is not one of per_unit, graduated,",
        "plans.yaml: plans[3] (tiers): minimum '100.5' has more decimals than JPY allows (0)",
        "plans.yaml: plans[3] (tiers) charges[0] tiers[1]: up_to 50 is below the previous tier's 100",
        "plans.yaml: plans[3] (tiers) charges[1] tiers[0]: only the last tier may be open",
        "plans.yaml: plans[3] (tiers) charges[1]: the last tier must be open (up_to: null)",
        "plans.yaml: plans[3] (tiers) charges[2] tiers[1]: up_to 10 duplicates the previous tier's",
        "plans.yaml: plans[3] (tiers): meter 'messages_sent' is charged more than once",
        "plans.yaml: plans[3] (tiers) thresholds[0]: a threshold takes exactly one of quantity",
        "plans.yaml: plans[3] (tiers) thresholds[1]: a threshold takes exactly one of quantity",
        "plans.yaml: plans[3] (tiers) thresholds[2]: threshold meter 'call_minutes' is not charged "
        "by this plan (charged: api_calls, bytes_transferred, messages_sent)",
        "plans.yaml: plans[0] and plans[1] use the same key 'ok'; plan keys must be unique",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in found), f"missing: {text}\nfound:\n" + "\n".join(found)
    assert len(found) == len(expected), "\n".join(found)


def test_the_error_message_counts_and_lists_the_problems():
    with pytest.raises(PlanError, match=r"plans.yaml has 22 problem\(s\):\n  - plans.yaml: plans\[2\]"):
        parse_plans(yaml.safe_load(BAD), METERS)


def test_floats_are_refused_everywhere_a_number_goes():
    found = problems(
        """
plans:
  - key: p
    currency: USD
    charges:
      - meter: api_calls
        model: graduated
        free_units: 0.5
        tiers: [{up_to: 10.5, unit_price: 0.01}, {up_to: null, flat_fee: 1.0}]
"""
    )
    assert len(found) == 4
    assert all("YAML float" in p and "quote it" in p for p in found)


def test_tier_and_threshold_shapes():
    found = problems(
        """
plans:
  - key: p
    currency: USD
    thresholds: [{quantity: 5}, {amount: "0"}, {amount: "1.001"}, 7]
    charges:
      - {meter: api_calls, model: volume, tiers: []}
      - {meter: messages_sent, model: volume, tiers: [{unit_price: "1"}, {up_to: null}, 5]}
"""
    )
    assert any("tiers must be a non-empty list" in p for p in found)
    assert any("charges[1] tiers[0]: up_to is required; write up_to: null" in p for p in found)
    assert any("charges[1] tiers[1]: a tier needs a unit_price, a flat_fee or both" in p for p in found)
    assert any("charges[1] tiers[2]: a tier must be a mapping" in p for p in found)
    assert any("thresholds[0]: a quantity threshold needs the meter it counts" in p for p in found)
    assert any("thresholds[1]: amount must be greater than 0" in p for p in found)
    assert any("thresholds[2]: amount '1.001' has more decimals than USD allows (2)" in p for p in found)
    assert any("thresholds[3]: a threshold must be a mapping" in p for p in found)
    assert len(found) == 8, "\n".join(found)


def test_the_file_level_shape():
    assert parse_plans(None, METERS) == {}
    assert parse_plans({"plans": None}, METERS) == {}
    assert problems("- a\n- b") == ("plans.yaml: the file must hold a mapping with a `plans` list.",)
    assert problems("plans: {}\nextra: 1") == (
        "plans.yaml: unknown key 'extra'; allowed keys: plans.",
        "plans.yaml: plans must be a list.",
    )
    assert problems("plans: [3]") == (
        "plans.yaml: plans[0] must be a mapping with key, name, currency and charges.",
    )


def test_a_missing_file_means_no_plans_and_bad_yaml_is_reported(tmp_path: Path):
    assert load_plans(tmp_path / "plans.yaml", METERS) == {}
    (tmp_path / "plans.yaml").write_text("plans: [\n")
    with pytest.raises(PlanError, match=r"plans\.yaml is not valid YAML"):
        load_plans(tmp_path / "plans.yaml", METERS)


def test_a_plan_needs_little_more_than_a_key_and_a_currency():
    plans = parse_plans({"plans": [{"key": "free-tier_2", "currency": "EUR"}]}, METERS)
    plan = plans["free-tier_2"]
    assert (plan.name, plan.base_fee, plan.minimum, plan.charges) == ("free-tier_2", None, None, ())
