"""GET /v1/meters/{slug}/usage against real JetStream and PostgreSQL: totals, windows, zones, groups, edges.

Every expected number is worked out by hand from the events each test sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest
from starlette.testclient import TestClient

from ingest_gateway.app import create_app
from meter_platform.config import DrainSettings
from tests.helpers import AUTH, api_call, publish, run_drain

pytestmark = pytest.mark.usefixtures("clean")

# Everything is in the stream before a drain starts, so a short idle time loses nothing.
QUICK_DRAIN = DrainSettings(batch_size=200, fetch_timeout=0.2, max_seconds=30, idle_seconds=0.3)


@pytest.fixture
def client(clean: None, settings, catalog) -> Iterator[TestClient]:
    """The gateway with its lifespan running, on an empty stream and empty tables."""
    with TestClient(
        create_app(settings, catalog), raise_server_exceptions=False, headers=AUTH
    ) as test_client:
        yield test_client


@pytest.fixture
def send(client, nats_server, database_url, catalog, monkeypatch):
    """Send events through the gateway (202 required), then drain them into PostgreSQL.

    The fixed dates of these tests (2025, for its DST change) are older than the default lateness
    (35 days), so the drain is told to accept late events.
    """
    monkeypatch.setenv("METER_MAX_LATENESS_DAYS", "3650")

    def send(*batches: list[dict[str, Any]]) -> None:
        for batch in batches:
            response = client.post("/v1/events", json=batch)
            assert response.status_code == 202, response.text
        counts = run_drain(nats_server.url, database_url, catalog, settings=QUICK_DRAIN)
        assert counts.quarantined == 0

    return send


def call(
    event_id: str, customer: str, ts: str, endpoint: str, method: str, region: str, nbytes: int
) -> dict[str, Any]:
    return api_call(
        event_id, customer, ts=ts, endpoint=endpoint, method=method, region=region, bytes_transferred=nbytes
    )


# The main data set: api_call events in July and August 2025 (all in the past).
#   id  customer  time (UTC)                     endpoint     method  region      bytes
EVENTS = [
    call("e1", "c1", "2025-07-24T10:00:00Z", "/v1/users", "GET", "us-east-1", 100),
    call("e2", "c1", "2025-07-24T10:00:30.5Z", "/v1/users", "POST", "us-east-1", 200),
    call("e3", "c2", "2025-07-24T10:01:15Z", "/v1/orders", "GET", "eu-west-1", 300),
    call("e4", "c2", "2025-07-24T11:59:59.999999Z", "/v1/orders", "GET", "eu-west-1", 400),
    call("e5", "c3", "2025-07-24T14:00:00+02:00", "/v1/users", "GET", "us-east-1", 500),  # 12:00Z
    call("e6", "c1", "2025-07-25T00:00:00Z", "/v1/users", "DELETE", "eu-west-1", 600),
    call("e7", "c2", "2025-07-31T23:59:59Z", "/v1/orders", "PUT", "us-east-1", 700),
    call("e8", "c1", "2025-08-01T00:00:00Z", "/v1/users", "GET", "eu-west-1", 800),
    call("e9", "c3", "2025-08-15T08:00:00Z", "/v1/users", "GET", "ap-south-1", 900),
]
JUL_AUG = {"from": "2025-07-01T00:00:00Z", "to": "2025-09-01T00:00:00Z"}


def usage(client: TestClient, slug: str, **params: str) -> dict[str, Any]:
    response = client.get(f"/v1/meters/{slug}/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def t(value: str) -> datetime:
    """An instant, whatever RFC 3339 spelling the answer uses."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def windows(answer: dict[str, Any]) -> list[tuple[datetime, datetime, Any]]:
    """(window_start, window_end, value) of the rows with usage, in order."""
    return [(t(r["window_start"]), t(r["window_end"]), r["value"]) for r in answer["data"] if r["value"]]


def by_group(answer: dict[str, Any]) -> dict[tuple, Any]:
    """value by (customer_id, *group values in the query's order) over the rows with usage."""
    return {(r["customer_id"], *r["group"].values()): r["value"] for r in answer["data"] if r["value"]}


def test_total_without_window_spans_the_query_range(client, send):
    send(EVENTS)
    answer = usage(client, "api_calls", **JUL_AUG)
    assert answer["meter"] == "api_calls" and answer["window"] is None
    assert t(answer["from"]) == t(JUL_AUG["from"]) and t(answer["to"]) == t(JUL_AUG["to"])
    assert len(answer["data"]) == 1
    row = answer["data"][0]
    assert row == {**row, "customer_id": None, "group": {}, "value": 9}
    assert t(row["window_start"]) == t("2025-07-01T00:00:00Z") and t(row["window_end"]) == t(
        "2025-09-01T00:00:00Z"
    )
    total = usage(client, "bytes_transferred", **JUL_AUG)["data"]
    assert [r["value"] for r in total] == [4500]  # 100 + 200 + ... + 900


def test_month_day_hour_minute_windows_in_utc(client, send):
    send(EVENTS)
    assert windows(usage(client, "api_calls", window="month", **JUL_AUG)) == [
        (t("2025-07-01T00:00:00Z"), t("2025-08-01T00:00:00Z"), 7),  # e1-e7
        (t("2025-08-01T00:00:00Z"), t("2025-09-01T00:00:00Z"), 2),  # e8, e9
    ]
    assert windows(usage(client, "bytes_transferred", window="month", **JUL_AUG)) == [
        (t("2025-07-01T00:00:00Z"), t("2025-08-01T00:00:00Z"), 2800),
        (t("2025-08-01T00:00:00Z"), t("2025-09-01T00:00:00Z"), 1700),
    ]
    assert windows(usage(client, "api_calls", window="day", **JUL_AUG)) == [
        (t("2025-07-24T00:00:00Z"), t("2025-07-25T00:00:00Z"), 5),  # e1-e5
        (t("2025-07-25T00:00:00Z"), t("2025-07-26T00:00:00Z"), 1),  # e6
        (t("2025-07-31T00:00:00Z"), t("2025-08-01T00:00:00Z"), 1),  # e7
        (t("2025-08-01T00:00:00Z"), t("2025-08-02T00:00:00Z"), 1),  # e8
        (t("2025-08-15T00:00:00Z"), t("2025-08-16T00:00:00Z"), 1),  # e9
    ]
    day = {"from": "2025-07-24T00:00:00Z", "to": "2025-07-25T00:00:00Z"}
    assert windows(usage(client, "api_calls", window="hour", **day)) == [
        (t("2025-07-24T10:00:00Z"), t("2025-07-24T11:00:00Z"), 3),  # e1, e2, e3
        (t("2025-07-24T11:00:00Z"), t("2025-07-24T12:00:00Z"), 1),  # e4 (11:59:59.999999)
        (t("2025-07-24T12:00:00Z"), t("2025-07-24T13:00:00Z"), 1),  # e5
    ]
    assert windows(usage(client, "bytes_transferred", window="minute", **day)) == [
        (t("2025-07-24T10:00:00Z"), t("2025-07-24T10:01:00Z"), 300),  # e1 + e2
        (t("2025-07-24T10:01:00Z"), t("2025-07-24T10:02:00Z"), 300),  # e3
        (t("2025-07-24T11:59:00Z"), t("2025-07-24T12:00:00Z"), 400),  # e4
        (t("2025-07-24T12:00:00Z"), t("2025-07-24T12:01:00Z"), 500),  # e5
    ]
    answer = usage(client, "api_calls", window="day", **JUL_AUG)
    assert answer["window"] == "day"
    assert all(r["customer_id"] is None and r["group"] == {} for r in answer["data"])


def test_group_by_customer_region_and_several_dimensions(client, send):
    send(EVENTS)
    answer = usage(client, "api_calls", group_by="customer_id", **JUL_AUG)
    assert by_group(answer) == {("c1",): 4, ("c2",): 3, ("c3",): 2}
    assert all(r["group"] == {} for r in answer["data"])

    answer = usage(client, "api_calls", group_by="region", **JUL_AUG)
    assert by_group(answer) == {(None, "us-east-1"): 4, (None, "eu-west-1"): 4, (None, "ap-south-1"): 1}
    assert all(set(r["group"]) == {"region"} for r in answer["data"])

    answer = usage(client, "api_calls", group_by="endpoint,method", **JUL_AUG)
    assert by_group(answer) == {
        (None, "/v1/users", "GET"): 4,  # e1, e5, e8, e9
        (None, "/v1/users", "POST"): 1,  # e2
        (None, "/v1/users", "DELETE"): 1,  # e6
        (None, "/v1/orders", "GET"): 2,  # e3, e4
        (None, "/v1/orders", "PUT"): 1,  # e7
    }
    answer = usage(client, "bytes_transferred", group_by="customer_id, region", **JUL_AUG)
    assert by_group(answer) == {
        ("c1", "us-east-1"): 300,  # e1 + e2
        ("c1", "eu-west-1"): 1400,  # e6 + e8
        ("c2", "eu-west-1"): 700,  # e3 + e4
        ("c2", "us-east-1"): 700,  # e7
        ("c3", "us-east-1"): 500,  # e5
        ("c3", "ap-south-1"): 900,  # e9
    }
    answer = usage(client, "api_calls", group_by="region", window="month", **JUL_AUG)
    assert {
        (t(r["window_start"]), r["group"]["region"]): r["value"] for r in answer["data"] if r["value"]
    } == {
        (t("2025-07-01T00:00:00Z"), "us-east-1"): 4,  # e1, e2, e5, e7
        (t("2025-07-01T00:00:00Z"), "eu-west-1"): 3,  # e3, e4, e6
        (t("2025-08-01T00:00:00Z"), "eu-west-1"): 1,  # e8
        (t("2025-08-01T00:00:00Z"), "ap-south-1"): 1,  # e9
    }


def test_customer_filter(client, send):
    send(EVENTS)
    answer = usage(client, "api_calls", customer_id="c1", **JUL_AUG)
    assert [(r["customer_id"], r["value"]) for r in answer["data"]] == [("c1", 4)]
    answer = usage(client, "api_calls", customer_id="c1", window="month", **JUL_AUG)
    assert windows(answer) == [
        (t("2025-07-01T00:00:00Z"), t("2025-08-01T00:00:00Z"), 3),  # e1, e2, e6
        (t("2025-08-01T00:00:00Z"), t("2025-09-01T00:00:00Z"), 1),  # e8
    ]
    assert all(r["customer_id"] == "c1" for r in answer["data"])
    answer = usage(client, "bytes_transferred", customer_id="c2", group_by="region", **JUL_AUG)
    assert by_group(answer) == {("c2", "eu-west-1"): 700, ("c2", "us-east-1"): 700}
    answer = usage(client, "api_calls", customer_id="c2", group_by="customer_id", **JUL_AUG)
    assert by_group(answer) == {("c2",): 3}
    assert windows(usage(client, "api_calls", customer_id="nobody", **JUL_AUG)) == []


# DST: Europe/Berlin leaves summer time on 2025-10-26 at 03:00 CEST (01:00Z), so that local day lasts 25 h.
#   Oct 25 local: [10-24T22:00Z, 10-25T22:00Z)   Oct 26 local: [10-25T22:00Z, 10-26T23:00Z)
#   Oct 27 local: [10-26T23:00Z, 10-27T23:00Z)
DST_EVENTS = [
    call("d1", "c1", "2025-10-25T10:00:00Z", "/a", "GET", "eu", 1),  # Oct 25, 12:00 CEST
    call("d2", "c1", "2025-10-25T23:59:59.999999+02:00", "/a", "GET", "eu", 2),  # Oct 25, last instant
    call("d3", "c1", "2025-10-26T00:00:00+02:00", "/a", "GET", "eu", 4),  # Oct 26, 00:00 CEST = 10-25T22:00Z
    call("d4", "c2", "2025-10-26T02:30:00+02:00", "/a", "GET", "eu", 8),  # 02:30 CEST = 00:30Z
    call("d5", "c2", "2025-10-26T02:30:00+01:00", "/a", "GET", "eu", 16),  # 02:30 CET again = 01:30Z
    call("d6", "c1", "2025-10-26T23:59:59+01:00", "/a", "GET", "eu", 32),  # Oct 26, 22:59:59Z
    call("d7", "c1", "2025-10-27T00:00:00+01:00", "/a", "GET", "eu", 64),  # Oct 27, 00:00 CET = 10-26T23:00Z
    call("d8", "c2", "2025-10-27T12:00:00Z", "/a", "GET", "eu", 128),
]


def test_berlin_day_windows_across_the_dst_change(client, send):
    send(DST_EVENTS)
    days = {"from": "2025-10-24T22:00:00Z", "to": "2025-10-27T23:00:00Z", "window": "day"}
    answer = usage(client, "api_calls", tz="Europe/Berlin", **days)
    assert windows(answer) == [
        (t("2025-10-24T22:00:00Z"), t("2025-10-25T22:00:00Z"), 2),  # d1, d2
        (t("2025-10-25T22:00:00Z"), t("2025-10-26T23:00:00Z"), 4),  # d3-d6: a 25-hour day
        (t("2025-10-26T23:00:00Z"), t("2025-10-27T23:00:00Z"), 2),  # d7, d8
    ]
    assert windows(usage(client, "bytes_transferred", tz="Europe/Berlin", **days)) == [
        (t("2025-10-24T22:00:00Z"), t("2025-10-25T22:00:00Z"), 3),
        (t("2025-10-25T22:00:00Z"), t("2025-10-26T23:00:00Z"), 60),
        (t("2025-10-26T23:00:00Z"), t("2025-10-27T23:00:00Z"), 192),
    ]
    # The same range in UTC days cuts elsewhere (the first window starts at `from`, inside Oct 24).
    assert [v for _, _, v in windows(usage(client, "api_calls", **days))] == [3, 4, 1]
    # Berlin hours: 02:00-03:00 happens twice on Oct 26, as two different windows.
    hours = usage(
        client,
        "api_calls",
        tz="Europe/Berlin",
        window="hour",
        **{"from": "2025-10-25T23:00:00Z", "to": "2025-10-26T03:00:00Z"},
    )
    assert windows(hours) == [
        (t("2025-10-26T00:00:00Z"), t("2025-10-26T01:00:00Z"), 1),  # d4
        (t("2025-10-26T01:00:00Z"), t("2025-10-26T02:00:00Z"), 1),  # d5
    ]
    # A Berlin month: October 2025 is 31 days and one hour long.
    month = usage(
        client,
        "api_calls",
        tz="Europe/Berlin",
        window="month",
        **{"from": "2025-09-30T22:00:00Z", "to": "2025-11-30T23:00:00Z"},
    )
    assert windows(month) == [(t("2025-09-30T22:00:00Z"), t("2025-10-31T23:00:00Z"), 8)]


def test_half_hour_zone_hour_windows(client, send):
    send(EVENTS)
    # Asia/Kolkata is UTC+05:30: its hours start at :30 UTC.
    answer = usage(
        client,
        "api_calls",
        tz="Asia/Kolkata",
        window="hour",
        **{"from": "2025-07-24T09:30:00Z", "to": "2025-07-24T12:30:00Z"},
    )
    assert windows(answer) == [
        (t("2025-07-24T09:30:00Z"), t("2025-07-24T10:30:00Z"), 3),  # e1, e2, e3
        (t("2025-07-24T11:30:00Z"), t("2025-07-24T12:30:00Z"), 2),  # e4, e5
    ]
    # A Kolkata day: 2025-07-24 local is [07-23T18:30Z, 07-24T18:30Z).
    answer = usage(
        client,
        "api_calls",
        tz="Asia/Kolkata",
        window="day",
        **{"from": "2025-07-23T18:30:00Z", "to": "2025-07-25T18:30:00Z"},
    )
    assert windows(answer) == [
        (t("2025-07-23T18:30:00Z"), t("2025-07-24T18:30:00Z"), 5),  # e1-e5
        (t("2025-07-24T18:30:00Z"), t("2025-07-25T18:30:00Z"), 1),  # e6
    ]


# Edge events around a range that is not minute-aligned; bytes are powers of two, so a sum names exactly
# the events it includes.
EDGE_EVENTS = [
    call("p1", "c1", "2025-07-24T10:30:05Z", "/e", "GET", "r", 1),  # before `from`
    call("p2", "c1", "2025-07-24T10:30:10Z", "/e", "GET", "r", 2),  # exactly at `from`: in
    call("p3", "c2", "2025-07-24T10:30:20Z", "/e", "GET", "r", 4),
    call("p4", "c1", "2025-07-24T10:31:00Z", "/e", "GET", "r", 8),
    call("p5", "c2", "2025-07-24T10:32:59.999999Z", "/e", "GET", "r", 16),
    call("p6", "c1", "2025-07-24T10:33:10Z", "/e", "GET", "r", 32),
    call("p7", "c1", "2025-07-24T10:33:29.999999Z", "/e", "GET", "r", 64),  # last instant before `to`
    call("p8", "c2", "2025-07-24T10:33:30Z", "/e", "GET", "r", 128),  # exactly at `to`: out
    call("p9", "c1", "2025-07-24T10:33:40Z", "/e", "GET", "r", 256),
    call("p10", "c1", "2025-07-24T10:33:00Z", "/e", "GET", "r", 512),
]


def _sum(client: TestClient, start: str, end: str, **params: str) -> Any:
    data = usage(client, "bytes_transferred", **{"from": start, "to": end}, **params)["data"]
    return sum(r["value"] for r in data)


def _count(client: TestClient, start: str, end: str, **params: str) -> Any:
    data = usage(client, "api_calls", **{"from": start, "to": end}, **params)["data"]
    return sum(r["value"] for r in data)


def test_ranges_not_aligned_to_minutes_are_exact(client, send):
    send(EDGE_EVENTS)
    start, end = "2025-07-24T10:30:10Z", "2025-07-24T10:33:30Z"
    # p2, p3, p4, p5, p10, p6, p7
    assert _sum(client, start, end) == 2 + 4 + 8 + 16 + 512 + 32 + 64 == 638
    assert _count(client, start, end) == 7
    answer = usage(client, "bytes_transferred", window="minute", **{"from": start, "to": end})
    assert [v for _, _, v in windows(answer)] == [6, 8, 16, 608]
    assert t(answer["data"][0]["window_start"]) in (t("2025-07-24T10:30:00Z"), t(start))
    assert t(answer["data"][-1]["window_end"]) in (t("2025-07-24T10:34:00Z"), t(end))
    # A microsecond later `from` drops p2; a microsecond earlier `to` drops p7.
    assert _sum(client, "2025-07-24T10:30:10.000001Z", end) == 636
    assert _sum(client, start, "2025-07-24T10:33:29.999999Z") == 574
    # Ranges inside one minute, and across one minute boundary.
    assert _sum(client, "2025-07-24T10:30:06Z", "2025-07-24T10:30:15Z") == 2
    assert _sum(client, "2025-07-24T10:30:30Z", "2025-07-24T10:31:00.000001Z") == 8
    assert _sum(client, "2025-07-24T10:30:20Z", "2025-07-24T10:31:00Z") == 4
    assert _sum(client, "2025-07-24T10:32:59.999999Z", "2025-07-24T10:33:00.000001Z") == 16 + 512
    # Offsets in the query are honoured: 12:30:10+02:00 is 10:30:10Z.
    assert _sum(client, "2025-07-24T12:30:10+02:00", "2025-07-24T10:33:30Z") == 638
    # Hour windows over the same unaligned range: one (clipped) window.
    assert [
        v
        for _, _, v in windows(
            usage(client, "bytes_transferred", window="hour", **{"from": start, "to": end})
        )
    ] == [638]
    assert _count(client, start, end, customer_id="c2") == 2  # p3, p5


def test_ranges_are_half_open(client, send):
    send(EDGE_EVENTS)
    # Minute-aligned: p4 at `from` counts, p10 at `to` does not.
    assert _sum(client, "2025-07-24T10:31:00Z", "2025-07-24T10:33:00Z") == 8 + 16
    assert _sum(client, "2025-07-24T10:33:00Z", "2025-07-24T10:34:00Z") == 512 + 32 + 64 + 128 + 256
    # Adjacent ranges add up to the range that covers both, each event counted once.
    cuts = [
        "2025-07-24T10:30:00Z",
        "2025-07-24T10:30:10Z",
        "2025-07-24T10:31:00Z",
        "2025-07-24T10:32:59.999999Z",
        "2025-07-24T10:33:30Z",
        "2025-07-24T10:34:00Z",
    ]
    parts = [_sum(client, a, b) for a, b in pairwise(cuts)]
    assert parts == [1, 2 + 4, 8, 16 + 512 + 32 + 64, 128 + 256]
    assert sum(parts) == _sum(client, cuts[0], cuts[-1]) == 1023


def test_resends_are_counted_once(client, send, nats_server, database_url, catalog):
    first = [
        call("r1", "c1", "2025-07-24T10:00:00Z", "/r", "GET", "us", 10),
        call("r2", "c1", "2025-07-24T10:05:00Z", "/r", "GET", "us", 20),
    ]
    send(first)
    resend = [
        call("r1", "c1", "2025-07-24T10:00:00Z", "/r", "GET", "us", 10),
        call("r2", "c1", "2025-07-24T10:05:00Z", "/r", "GET", "us", 20),
        call("r3", "c2", "2025-07-24T10:10:00Z", "/r", "GET", "us", 40),
        call("r3", "c2", "2025-07-24T10:10:00Z", "/r", "GET", "us", 40),
    ]
    publish(nats_server.url, call("r2", "c1", "2025-07-24T10:05:00Z", "/r", "GET", "us", 20), msg_id="r2")
    send(resend, resend[:1])
    day = {"from": "2025-07-24T00:00:00Z", "to": "2025-07-25T00:00:00Z"}
    assert [r["value"] for r in usage(client, "api_calls", **day)["data"]] == [3]
    assert [r["value"] for r in usage(client, "bytes_transferred", **day)["data"]] == [70]
    # The first version of an id wins; a resend with other content changes nothing.
    send([call("r1", "c9", "2025-07-24T10:00:00Z", "/r", "GET", "us", 1000)])
    assert [r["value"] for r in usage(client, "bytes_transferred", **day)["data"]] == [70]
    assert by_group(usage(client, "api_calls", group_by="customer_id", **day)) == {("c1",): 2, ("c2",): 1}


def test_sum_values_are_exact_and_integers_stay_integers(client, send):
    big = 2**53 + 1  # not representable as a float
    send(
        [
            call("b1", "c1", "2025-07-24T10:00:00Z", "/b", "GET", "us", big),
            call("b2", "c1", "2025-07-24T10:00:01Z", "/b", "GET", "us", 2),
            call("b3", "c1", "2025-07-24T10:02:00Z", "/b", "GET", "us", 0),
        ],
        [
            {
                "id": f"m{i}",
                "event_type": "call_completed",
                "customer_id": "c1",
                "timestamp": ts,
                "properties": {"direction": "outbound", "duration_minutes": minutes, "country": "DE"},
            }
            for i, (ts, minutes) in enumerate(
                [
                    ("2025-07-24T10:00:00Z", 0.1),
                    ("2025-07-24T10:00:10Z", 0.2),  # same minute: 0.3 exactly
                    ("2025-07-24T10:05:00Z", 1.5),
                    ("2025-07-24T10:06:00Z", 2.5),  # 4, an integer
                ]
            )
        ],
    )
    day = {"from": "2025-07-24T00:00:00Z", "to": "2025-07-25T00:00:00Z"}
    response = client.get("/v1/meters/bytes_transferred/usage", params=day)
    value = json.loads(response.text)["data"][0]["value"]
    assert type(value) is int and value == big + 2 == 9007199254740995
    minutes = usage(client, "call_minutes", window="minute", **day)
    values = [r["value"] for r in minutes["data"] if r["value"]]
    assert values == [0.3, 1.5, 2.5]
    assert all(type(v) is float for v in values)
    total = usage(client, "call_minutes", **day)["data"][0]["value"]
    assert total == 4.3
    hourly = [r["value"] for r in usage(client, "call_minutes", window="hour", **day)["data"]]
    assert hourly == [4.3]
    later = [
        r["value"]
        for r in usage(
            client, "call_minutes", **{"from": "2025-07-24T10:05:00Z", "to": "2025-07-24T10:07:00Z"}
        )["data"]
    ]
    assert later == [4] and type(later[0]) is int
    counts = [r["value"] for r in usage(client, "api_calls", window="minute", **day)["data"]]
    assert counts == [2, 1] and all(type(v) is int for v in counts)


def test_meter_filter_counts_the_same_from_aggregates_and_raw_edges(client, send):
    # sms_segments sums `segments` of message_sent events with channel sms only.
    def message(event_id: str, ts: str, channel: str, segments: int, country: str = "DE") -> dict[str, Any]:
        return {
            "id": event_id,
            "event_type": "message_sent",
            "customer_id": "c1",
            "timestamp": ts,
            "properties": {"channel": channel, "segments": segments, "country": country},
        }

    send(
        [
            message("s1", "2025-07-24T10:00:10Z", "sms", 1),
            message("s2", "2025-07-24T10:00:20Z", "email", 2),
            message("s3", "2025-07-24T10:01:30Z", "sms", 4, "FR"),
            message("s4", "2025-07-24T10:02:40Z", "sms", 8),
            message("s5", "2025-07-24T10:02:50Z", "push", 16),
        ]
    )
    aligned = {"from": "2025-07-24T10:00:00Z", "to": "2025-07-24T10:03:00Z"}
    unaligned = {"from": "2025-07-24T10:00:05Z", "to": "2025-07-24T10:02:45Z"}
    for window in (aligned, unaligned):  # s5 (push) is after the unaligned `to`
        assert [r["value"] for r in usage(client, "sms_segments", **window)["data"]] == [13]
        assert by_group(usage(client, "sms_segments", group_by="country", **window)) == {
            (None, "DE"): 9,
            (None, "FR"): 4,
        }
    assert [r["value"] for r in usage(client, "messages_sent", **aligned)["data"]] == [5]
    assert [r["value"] for r in usage(client, "messages_sent", **unaligned)["data"]] == [4]
    assert by_group(usage(client, "messages_sent", group_by="channel", **aligned)) == {
        (None, "sms"): 3,
        (None, "email"): 1,
        (None, "push"): 1,
    }
    assert by_group(usage(client, "messages_sent", group_by="channel", **unaligned)) == {
        (None, "sms"): 3,
        (None, "email"): 1,
    }


def test_from_far_back_is_echoed_as_rfc3339(client, send):
    send(EVENTS)
    answer = usage(client, "api_calls", **{"from": "0099-01-01T00:00:00Z", "to": "2025-09-01T00:00:00Z"})
    assert t(answer["from"]) == t("0099-01-01T00:00:00Z")
    assert [r["value"] for r in answer["data"]] == [9]
    assert t(answer["data"][0]["window_start"]) == t("0099-01-01T00:00:00Z")


def _generated_rows(plan: dict[str, Any]) -> int:
    """Rows produced by generate_series in an EXPLAIN ANALYZE plan (every loop)."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Function Name") == "generate_series" else 0
    return own + sum(_generated_rows(p) for p in plan.get("Plans", []))


@pytest.mark.parametrize("window", [None, "day"])
def test_a_range_of_centuries_generates_only_the_days_that_hold_data(
    client, send, database_url, catalog, window
):
    """From the year 99 to 2025 the day, hour and minute series cover the days with rows (two months
    here), not the 17 million hours of the range; the answer is the same."""
    from meter_platform.meters.aggregates import psycopg_bind
    from meter_platform.meters.usage import build_query, usage_sql
    from meter_platform.storage import db

    send(EVENTS)
    params = {"from": "0099-01-01T00:00:00Z", "to": "2025-09-01T00:00:00Z"}
    meter = catalog.meter("api_calls")
    assert meter is not None
    sql, args = usage_sql(build_query(meter, params | ({"window": window} if window else {})), psycopg_bind)
    with db.connect(database_url) as conn:
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, args).fetchone()[0]
    generated = _generated_rows(plan["Plan"])
    assert 0 < generated < 3 * 24 * 40  # the days, hours and hour spans of July 24 - August 15
    assert sum(r["value"] for r in usage(client, "api_calls", **params)["data"]) == 9


@pytest.mark.parametrize(
    ("path", "params", "mentions"),
    [
        ("/v1/meters/no_such_meter/usage", {}, "no_such_meter"),
        ("/v1/meters/api_calls/usage", {"group_by": "bucket"}, "bucket"),
        ("/v1/meters/bytes_transferred/usage", {"group_by": "region,endpoint"}, "endpoint"),
        (
            "/v1/meters/api_calls/usage",
            {"from": "2025-08-01T00:00:00Z", "to": "2025-07-01T00:00:00Z"},
            "from",
        ),
        (
            "/v1/meters/api_calls/usage",
            {"from": "2025-08-01T00:00:00Z", "to": "2025-08-01T02:00:00+02:00"},
            "from",
        ),
        ("/v1/meters/api_calls/usage", {"tz": "Mars/Olympus_Mons"}, "Mars/Olympus_Mons"),
        ("/v1/meters/api_calls/usage", {"tz": "../../etc/passwd"}, "tz"),
        ("/v1/meters/api_calls/usage", {"tz": "Europe/" + "x" * 300}, "tz"),  # was a 500 (OSError)
        ("/v1/meters/api_calls/usage", {"window": "week"}, "week"),
        ("/v1/meters/api_calls/usage", {"window": "DAY"}, "window"),
        ("/v1/meters/api_calls/usage", {"from": "yesterday"}, "from"),
        ("/v1/meters/api_calls/usage", {"to": "2025-07-24T10:00:00"}, "to"),
        ("/v1/meters/api_calls/usage", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
        ("/v1/meters/api_calls/usage", {"to": "9999-12-31T23:59:59-01:00"}, "to"),
        ("/v1/meters/api_calls/usage", {"customer_id": "nul\x00byte"}, "customer_id"),
    ],
)
def test_bad_usage_queries_are_400_with_a_reason(client, path, params, mentions):
    query = {"from": "2025-07-01T00:00:00Z", "to": "2025-08-01T00:00:00Z", **params}
    response = client.get(path, params=query)
    assert response.status_code == 400, response.text
    body = response.json()
    assert isinstance(body["error"], str) and mentions in body["error"]
    assert isinstance(body["details"], list)


def total(answer: dict[str, Any]) -> Any:
    return sum(r["value"] for r in answer["data"])


def test_filters_count_only_rows_whose_dimension_has_one_of_the_values(client, send):
    """filter[<dimension>]=<value>, repeated for several values, on whole minutes, hours and days (from
    the aggregates) and on the raw edge minutes of an unaligned range alike."""
    send(EVENTS)
    eu = {"filter[region]": "eu-west-1"}
    assert total(usage(client, "api_calls", **JUL_AUG, **eu)) == 4  # e3 e4 e6 e8
    assert total(usage(client, "bytes_transferred", **JUL_AUG, **eu)) == 300 + 400 + 600 + 800
    two_regions = client.get(
        "/v1/meters/api_calls/usage",
        params=[*JUL_AUG.items(), ("filter[region]", "eu-west-1"), ("filter[region]", "ap-south-1")],
    )
    assert two_regions.status_code == 200 and total(two_regions.json()) == 5
    customers = client.get(
        "/v1/meters/api_calls/usage",
        params=[*JUL_AUG.items(), ("filter[customer_id]", "c1"), ("filter[customer_id]", "c3")],
    )
    assert total(customers.json()) == 6  # c1: e1 e2 e6 e8, c3: e5 e9
    # two dimensions: both must match; with windows and grouping as usual
    both = usage(
        client,
        "api_calls",
        **JUL_AUG,
        **eu,
        **{"filter[method]": "GET"},
        window="day",
        group_by="customer_id",
    )
    assert {(r["customer_id"], r["window_start"][:10], r["value"]) for r in both["data"]} == {
        ("c2", "2025-07-24", 2),
        ("c1", "2025-08-01", 1),
    }
    # an unaligned range: e2 (10:00:30.5, us-east-1) and e3 (10:01:15, eu-west-1) sit in its edge minutes
    unaligned = {"from": "2025-07-24T10:00:05Z", "to": "2025-07-24T10:01:45Z"}
    assert total(usage(client, "api_calls", **unaligned)) == 2
    assert total(usage(client, "api_calls", **unaligned, **eu)) == 1
    assert usage(client, "api_calls", **JUL_AUG, **{"filter[region]": "nowhere"})["data"] == []


@pytest.mark.parametrize(
    ("params", "mentions"),
    [({"filter[bucket]": "b1"}, "bucket"), ({"filter": "region=eu-west-1"}, "filter[")],
)
def test_a_filter_on_an_unknown_dimension_is_a_400(client, params, mentions):
    response = client.get("/v1/meters/api_calls/usage", params={**JUL_AUG, **params})
    assert response.status_code == 400 and mentions in response.json()["error"]
