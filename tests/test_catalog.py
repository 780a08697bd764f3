"""The catalog is checked at start-up, every mistake reported with where it is and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meter_platform.catalog import CatalogError, load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR
from tests.helpers import api_call, publish, query, run_drain

EVENTS = """
event_types:
  api_call:
    properties:
      endpoint: {type: string, required: true}
      label: {type: string}
"""


def write(tmp_path: Path, meters: str, events: str = EVENTS) -> Path:
    (tmp_path / "meters.yaml").write_text(meters)
    (tmp_path / "events.yaml").write_text(events)
    return tmp_path


def test_the_example_catalog_loads_with_the_contract_meters():
    catalog = load_catalog(EXAMPLE_CATALOG_DIR)
    assert catalog.meter("api_calls").as_json() == {
        "slug": "api_calls",
        "event_type": "api_call",
        "aggregation": "count",
        "value_property": None,
        "group_by": ["endpoint", "method", "region"],
    }
    assert catalog.meter("bytes_transferred").as_json() == {
        "slug": "bytes_transferred",
        "event_type": "api_call",
        "aggregation": "sum",
        "value_property": "bytes_transferred",
        "group_by": ["region"],
    }
    assert set(catalog.event_types) >= {
        "api_call",
        "storage_usage",
        "message_sent",
        "call_completed",
        "analytics_query",
    }


@pytest.mark.parametrize(
    ("meters", "message"),
    [
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: median}",
            "aggregation 'median' is not one of count, sum, min, max, avg, unique_count, latest",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: sum}",
            "aggregation 'sum' needs a value_property",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: count, group_by: ['']}",
            "group_by entry '' names no property path",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: count, group_by: [customer_id]}",
            "customer_id is a dimension of every meter",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: max, value_property: label}",
            "value_property 'label' is declared as string; max needs an integer or number",
        ),
        (
            "meters:\n  - {slug: m, event_type: nope, aggregation: count}",
            "event_type 'nope' is not declared in events.yaml",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: count, value_property: label}",
            "a count meter takes no value_property",
        ),
        (
            "meters:\n  - {slug: m, event_type: api_call, aggregation: count}\n"
            "  - {slug: m, event_type: api_call, aggregation: count}",
            "slug 'm' is used by more than one meter",
        ),
        (
            "meters:\n  - {slug: Bad-Slug, event_type: api_call, aggregation: count}",
            "slug must be lower-case",
        ),
    ],
)
def test_mistakes_in_meters_yaml_are_reported(tmp_path, meters, message):
    with pytest.raises(CatalogError) as caught:
        load_catalog(write(tmp_path, meters))
    assert message in str(caught.value)
    assert "meters.yaml" in str(caught.value)


def test_every_mistake_is_listed_at_once(tmp_path):
    events = "event_types:\n  api_call:\n    properties:\n      n: {type: float}\n      s: {type: string, pattern: '('}"
    meters = (
        "meters:\n  - {slug: a, event_type: api_call, aggregation: sum}\n  - {slug: b, aggregation: count}"
    )
    with pytest.raises(CatalogError) as caught:
        load_catalog(write(tmp_path, meters, events))
    text = str(caught.value)
    assert "has 4 problem(s)" in text
    assert "type 'float' is not one of" in text and "not a valid regular expression" in text
    assert "needs a value_property" in text and "event_type is required" in text


def test_a_missing_file_says_how_to_fix_it(tmp_path):
    with pytest.raises(CatalogError, match="METER_CATALOG_DIR"):
        load_catalog(tmp_path)


@pytest.mark.usefixtures("clean")
def test_unknown_event_types_are_stored_when_the_catalog_accepts_them(nats_server, database_url, tmp_path):
    shutil.copytree(EXAMPLE_CATALOG_DIR, tmp_path, dirs_exist_ok=True)
    events = tmp_path / "events.yaml"
    events.write_text("accept_unknown_event_types: true\n" + events.read_text())
    accepting = load_catalog(tmp_path)
    publish(nats_server.url, [{"id": "t1", "event_type": "teleport", "customer_id": "c1"}, api_call("a1")])
    counts = run_drain(nats_server.url, database_url, accepting)
    assert (counts.stored, counts.quarantined) == (2, 0)
    assert query(database_url, "SELECT event_type FROM usage_events ORDER BY id") == [
        ("api_call",),
        ("teleport",),
    ]
