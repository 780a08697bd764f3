"""OpenMeter's official Python SDK, unchanged but for its endpoint and token, against the real gateway:
CloudEvents in (one, a batch, plain JSON), 204 once durable, counted once however often a (source, id)
is resent, refused whole with problem details, and its usage query equal to our own usage API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openmeter
import openmeter.models
import pytest
from corehttp.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

from tests.helpers import AUTH, run_drain

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
START = NOW - timedelta(hours=3)


def client(gateway_url: str, key: str) -> openmeter.Client:
    """The SDK pointed at the gateway, with one of our keys as its token."""
    return openmeter.Client(endpoint=f"{gateway_url}/openmeter", token=key)


def cloud_event(
    raw_id: str, subject: str, minutes: float, endpoint: str = "/v1/users", source: str = "tests", **data: Any
) -> dict[str, Any]:
    """An api_call CloudEvent ``minutes`` after START."""
    return {
        "specversion": "1.0",
        "id": raw_id,
        "source": source,
        "type": "api_call",
        "subject": subject,
        "time": (START + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z"),
        "data": {"endpoint": endpoint, "method": "GET", "region": "eu-west-1", **data},
    }


def traffic() -> list[dict[str, Any]]:
    """60 events over ~2.5 hours: two customers, three endpoints, at irregular seconds."""
    return [
        cloud_event(
            f"e{i}",
            f"cust-{i % 2}",
            i * 2.5 + 0.37,
            endpoint=f"/v1/{['a', 'b', 'c'][i % 3]}",
            bytes_transferred=100 + i,
        )
        for i in range(60)
    ]


def usage(gateway_url: str, slug: str, **params: str) -> dict[str, Any]:
    """Our own usage API's answer."""
    answer = httpx.get(f"{gateway_url}/v1/meters/{slug}/usage", params=params, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_sdk_ingest_is_durable_counted_once_and_exact(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    om = client(gateway_url, admin_key)
    events = traffic()
    assert om.events.ingest_event(events[0]) is None  # application/cloudevents+json, 204
    assert om.events.ingest_events(events[1:40]) is None  # application/cloudevents-batch+json
    assert om.events.ingest_events_json(events[40:]) is None  # application/json, an array
    # application/json, one event (the SDK sends a body only for its Event model, not a dict)
    assert om.events.ingest_events_json(openmeter.models.Event(events[5])) is None
    # Resent, whole and in part, before and after the pipeline has them: counted once.
    om.events.ingest_events(events)
    run_drain(nats_server.url, database_url, catalog)
    om.events.ingest_events(events[:30])
    run_drain(nats_server.url, database_url, catalog)

    answer = usage(
        gateway_url,
        "api_calls",
        **{"from": START.isoformat(), "to": NOW.isoformat(), "group_by": "customer_id"},
    )
    assert {r["customer_id"]: r["value"] for r in answer["data"]} == {"cust-0": 30, "cust-1": 30}
    total = usage(gateway_url, "bytes_transferred", **{"from": START.isoformat(), "to": NOW.isoformat()})
    assert total["data"][0]["value"] == sum(100 + i for i in range(60))

    stored = httpx.get(f"{gateway_url}/v1/events/openmeter:tests:e7", headers=AUTH).json()
    assert stored["state"] == "stored"
    assert (stored["event_type"], stored["customer_id"]) == ("api_call", "cust-1")
    assert stored["timestamp"] == (START + timedelta(minutes=7 * 2.5 + 0.37)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert stored["metadata"]["cloudevents"] == {"specversion": "1.0", "id": "e7", "source": "tests"}


def test_same_id_from_two_sources_is_two_events_and_sources_with_colons_stay_apart(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    om = client(gateway_url, admin_key)
    om.events.ingest_events(
        [
            cloud_event("x", "c1", 1, source="svc-a"),
            cloud_event("x", "c1", 1, source="svc-b"),
            cloud_event("b:c", "c1", 1, source="a"),  # must not be the same as source "a:b", id "c"
            cloud_event("c", "c1", 1, source="a:b"),
        ]
    )
    run_drain(nats_server.url, database_url, catalog)
    answer = usage(gateway_url, "api_calls", **{"from": START.isoformat(), "to": NOW.isoformat()})
    assert answer["data"][0]["value"] == 4


def _compare(gateway_url: str, ours: dict[str, Any], theirs: Any, by_customer: bool) -> None:
    expected = [
        (
            r["window_start"],
            r["window_end"],
            r["customer_id"] if by_customer else None,
            r["group"],
            r["value"],
        )
        for r in ours["data"]
    ]
    got = [
        (_ts(r.window_start), _ts(r.window_end), r.subject, dict(r.group_by), r.value) for r in theirs.data
    ]
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert expected, "the comparison must compare something"


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("window", "group_by", "tz"),
    [
        (None, [], None),
        ("HOUR", ["subject"], None),
        ("MINUTE", ["subject", "endpoint"], None),
        ("DAY", ["endpoint"], "Asia/Kolkata"),
    ],
)
def test_sdk_query_equals_our_usage_api(
    gateway_url, admin_key, nats_server, database_url, catalog, window, group_by, tz
):
    om = client(gateway_url, admin_key)
    om.events.ingest_events(traffic())
    run_drain(nats_server.url, database_url, catalog)
    # A range that is not minute-aligned: edges come from the raw events, the rest from the aggregates.
    start, end = START + timedelta(seconds=50), NOW - timedelta(minutes=20, seconds=13)
    for slug, dimension in (("api_calls", "endpoint"), ("bytes_transferred", "region")):
        group_by = [dimension if g == "endpoint" else g for g in group_by]
        theirs = om.meters.query_json(
            slug,
            from_parameter=start,
            to=end,
            window_size=window,
            window_time_zone=tz,
            group_by=group_by or None,
        )
        params = {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "window": (window or "").lower(),
            "tz": tz or "",
            "group_by": ",".join("customer_id" if g == "subject" else g for g in group_by),
        }
        ours = usage(gateway_url, slug, **params)
        _compare(gateway_url, ours, theirs, "subject" in group_by)
        assert theirs.window_size == window
        # The same query as a JSON body (the SDK's meters.query, POST).
        request = {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "windowSize": window,
            "windowTimeZone": tz,
            "groupBy": group_by or None,
        }
        posted = om.meters.query(slug, {k: v for k, v in request.items() if v is not None})
        _compare(gateway_url, ours, posted, "subject" in group_by)


def test_sdk_query_by_subjects_and_the_meters(gateway_url, admin_key, nats_server, database_url, catalog):
    om = client(gateway_url, admin_key)
    om.events.ingest_events(traffic())
    run_drain(nats_server.url, database_url, catalog)
    theirs = om.meters.query_json(
        "api_calls", from_parameter=START, to=NOW, window_size="HOUR", subject=["cust-1", "cust-0", "nobody"]
    )
    for customer in ("cust-0", "cust-1"):
        ours = usage(
            gateway_url,
            "api_calls",
            **{"from": START.isoformat(), "to": NOW.isoformat(), "window": "hour", "customer_id": customer},
        )
        mine = [r for r in theirs.data if r.subject == customer]
        assert [(_ts(r.window_start), r.value) for r in mine] == [
            (r["window_start"], r["value"]) for r in ours["data"]
        ]
    assert {r.subject for r in theirs.data} == {"cust-0", "cust-1"}
    only = om.meters.query_json(
        "api_calls", from_parameter=START, subject=["cust-0"], filter_customer_id=["cust-1"]
    )
    assert only.data == []  # both filters: the customers in both
    assert only.from_property == START and only.to > NOW  # `to` defaults to now
    with pytest.raises(HttpResponseError) as raised:
        om.meters.query_json(
            "api_calls", window_time_zone="Mars/Olympus", subject=["a"], filter_customer_id=["b"]
        )
    assert raised.value.status_code == 400 and "Mars/Olympus" in raised.value.model.detail

    meters = om.meters.list()
    assert [m.slug for m in meters] == [m.slug for m in catalog.meters]
    api_calls = om.meters.get("api_calls")
    assert (api_calls.aggregation, api_calls.event_type, api_calls.group_by["endpoint"]) == (
        "COUNT",
        "api_call",
        "$.endpoint",
    )
    with pytest.raises(ResourceNotFoundError):
        om.meters.query_json("no_such_meter")


def test_filter_group_by_is_our_dimension_filter(gateway_url, admin_key, nats_server, database_url, catalog):
    """filterGroupBy through the SDK's POST query (a list of values per dimension), its GET query_json,
    and the URL forms, equal to our usage API's filter[...]; an unknown dimension is a 400 problem."""
    om = client(gateway_url, admin_key)
    om.events.ingest_events(traffic())
    run_drain(nats_server.url, database_url, catalog)
    start, end = START + timedelta(seconds=50), NOW  # edges from raw events too
    ours = usage(
        gateway_url,
        "api_calls",
        **{"from": start.isoformat(), "to": end.isoformat(), "window": "hour", "group_by": "customer_id"},
        **{"filter[endpoint]": "/v1/a"},
    )
    # every third of the 60 events, less e0 (22 s after START, before the range)
    assert ours["data"] and sum(r["value"] for r in ours["data"]) == 19
    body = {"from": start.isoformat(), "to": end.isoformat(), "windowSize": "HOUR", "groupBy": ["subject"]}
    posted = om.meters.query("api_calls", {**body, "filterGroupBy": {"endpoint": ["/v1/a"]}})
    _compare(gateway_url, ours, posted, True)
    two = om.meters.query("api_calls", {**body, "filterGroupBy": {"endpoint": ["/v1/a", "/v1/b"]}})
    assert sum(r.value for r in two.data) == 39
    url = f"{gateway_url}/openmeter/api/v1/meters/api_calls/query"
    params = {"from": start.isoformat(), "to": end.isoformat(), "filterGroupBy[endpoint]": "/v1/c"}
    answer = httpx.get(url, params=params, headers=AUTH, timeout=30)
    assert answer.status_code == 200 and sum(r["value"] for r in answer.json()["data"]) == 20
    # the SDK's GET sends the whole map in one parameter (as a Python dict literal)
    got = om.meters.query_json(
        "api_calls", from_parameter=start, to=end, filter_group_by={"endpoint": "/v1/c"}
    )
    assert sum(r.value for r in got.data) == 20
    as_json = httpx.get(
        url, params={**params, "filterGroupBy": '{"endpoint": ["/v1/a", "/v1/c"]}'}, headers=AUTH
    )
    assert sum(r["value"] for r in as_json.json()["data"]) == 39
    for bad in ("__import__('os')", "[1, 2]", "{'endpoint': 5}"):
        refused = httpx.get(url, params={**params, "filterGroupBy": bad}, headers=AUTH)
        assert refused.status_code == 400, bad
    with pytest.raises(HttpResponseError) as raised:
        om.meters.query("api_calls", {**body, "filterGroupBy": {"planet": ["mars"]}})
    assert raised.value.status_code == 400 and "planet" in raised.value.model.detail


def test_bad_events_are_refused_whole_as_problem_details(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    om = client(gateway_url, admin_key)
    good, bad = (
        cloud_event("ok-1", "c1", 1),
        {**cloud_event("bad-1", "c1", 2), "data": ["not", "an", "object"]},
    )
    with pytest.raises(HttpResponseError) as raised:
        om.events.ingest_events([good, bad])
    assert raised.value.status_code == 400
    assert (
        raised.value.model.status == 400 and "nothing of this request was kept" in raised.value.model.detail
    )

    url = f"{gateway_url}/openmeter/api/v1/events"
    headers = {**AUTH, "Content-Type": "application/cloudevents-batch+json"}
    no_spec = {k: v for k, v in good.items() if k != "specversion"}
    answer = httpx.post(url, json=[no_spec, {**good, "time": "yesterday"}], headers=headers)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["title"] == "Bad Request" and problem["instance"] == "/openmeter/api/v1/events"
    assert [(e["index"], e["field"]) for e in problem["extensions"]["validationErrors"]] == [
        (0, "specversion"),
        (1, "time"),
    ]
    for body, content_type, status in [
        (b"{not json", "application/cloudevents+json", 400),
        (b'[{"a": 1}]', "application/cloudevents+json", 400),  # one event, not an array
        (b"{}", "text/plain", 415),
    ]:
        answer = httpx.post(url, content=body, headers={**AUTH, "Content-Type": content_type})
        assert answer.status_code == status and answer.json()["status"] == status

    with pytest.raises(ClientAuthenticationError) as refused:
        client(gateway_url, "mk_live_not-a-key").events.ingest_event(good)
    assert refused.value.model.status == 401 and "unknown or revoked" in refused.value.model.detail
    run_drain(nats_server.url, database_url, catalog)
    assert httpx.get(f"{gateway_url}/v1/events/openmeter:tests:ok-1", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # deep nesting
        b'{"specversion": "1.0", "id": "\xff\xfe", "source": "s", "type": "api_call", "subject": "c"}',
        b'{"specversion": "1.0", "id": "n", "source": "s", "type": "api_call", "subject": "c", "data": {"a": "\\u0000"}}',
        b'{"specversion": "1.0", "id": "n", "source": "s\\u0000", "type": "api_call", "subject": "c"}',
        b'{"specversion": "1.0", "id": "n", "source": "s", "type": "api_call", "subject": "c", "data": {"a": 1e400}}',
        b'{"specversion": 1.0, "id": 5, "source": null, "type": [], "subject": {}}',
        b'"just a string"',
    ],
)
def test_hostile_bodies_are_a_400_problem(gateway_url, body):
    answer = httpx.post(
        f"{gateway_url}/openmeter/api/v1/events",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/problem+json" and answer.json()["status"] == 400
