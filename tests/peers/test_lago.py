"""Lago's official Python SDK, unchanged but for its api_url and key, against the real gateway: events
(one, a batch) answered once durable, counted once however often a transaction_id is resent, found by
transaction_id, refused whole in Lago's error shape, and exact in our usage API once drained."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models.event import BatchEvent, Event

from tests.helpers import AUTH, run_drain

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
START = NOW - timedelta(hours=3)


def client(gateway_url: str, key: str) -> Client:
    """The SDK pointed at the gateway (the trailing slash matters: the SDK joins api/v1/ onto it)."""
    return Client(api_key=key, api_url=f"{gateway_url}/lago/")


def at(minutes: float) -> datetime:
    return START + timedelta(minutes=minutes)


def unix(minutes: float) -> str:
    """The time as the SDK's users send it: unix seconds with fractions, as a string."""
    return f"{at(minutes).timestamp():.3f}"


def lago_event(
    tx: str, subscription: str, minutes: float, endpoint: str = "/v1/users", **properties: Any
) -> Event:
    """An api_call event of the SDK's model."""
    return Event(
        transaction_id=tx,
        external_subscription_id=subscription,
        code="api_call",
        timestamp=unix(minutes),
        properties={"endpoint": endpoint, "method": "POST", "region": "us-east-1", **properties},
    )


def usage(gateway_url: str, slug: str, **params: str) -> dict[str, Any]:
    """Our own usage API's answer over [START, NOW), by customer."""
    params = {"from": START.isoformat(), "to": NOW.isoformat(), "group_by": "customer_id", **params}
    answer = httpx.get(f"{gateway_url}/v1/meters/{slug}/usage", params=params, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return {r["customer_id"]: r["value"] for r in answer.json()["data"]}


def test_sdk_events_are_durable_counted_once_found_and_exact(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    lago = client(gateway_url, admin_key)
    one = lago.events.create(lago_event("tx-0", "sub-a", 1.5, bytes_transferred=10))
    assert one is not None
    assert (one.transaction_id, one.code, one.external_subscription_id) == ("tx-0", "api_call", "sub-a")
    assert one.lago_customer_id == "sub-a"  # no external_customer_id: the subscription names the customer
    assert one.timestamp == at(1.5).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    batch = [
        lago_event(f"tx-{i}", f"sub-{'ab'[i % 2]}", i * 1.7, bytes_transferred=10 + i) for i in range(1, 100)
    ]
    started = time.monotonic()
    assert lago.events.batch_create(BatchEvent(events=batch)) is None
    took = time.monotonic() - started
    assert took < 3.0, f"batch_create gives up after 5 s; 99 events took {took:.2f} s"
    # Pending (in JetStream, not yet in PostgreSQL) is found too.
    pending = lago.events.find("tx-7")
    assert (pending.transaction_id, pending.lago_customer_id) == ("tx-7", "sub-b")

    # Resends, before and after the pipeline has them: counted once.
    lago.events.batch_create(BatchEvent(events=batch[:50]))
    lago.events.create(lago_event("tx-0", "sub-a", 1.5, bytes_transferred=10))
    run_drain(nats_server.url, database_url, catalog)
    lago.events.batch_create(BatchEvent(events=batch))
    run_drain(nats_server.url, database_url, catalog)

    assert usage(gateway_url, "api_calls") == {"sub-a": 50, "sub-b": 50}
    assert usage(gateway_url, "bytes_transferred") == {
        "sub-a": sum(10 + i for i in range(0, 100, 2)),
        "sub-b": sum(10 + i for i in range(1, 100, 2)),
    }
    stored = lago.events.find("tx-7")
    assert (stored.code, stored.external_subscription_id, stored.properties["bytes_transferred"]) == (
        "api_call",
        "sub-b",
        17,
    )
    assert stored.timestamp == at(7 * 1.7).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "000Z"
    ours = httpx.get(f"{gateway_url}/v1/events/lago:tx-7", headers=AUTH).json()
    assert ours["state"] == "stored" and ours["metadata"]["lago"]["transaction_id"] == "tx-7"


def test_customer_and_timestamp_forms(gateway_url, admin_key, nats_server, database_url, catalog):
    url = f"{gateway_url}/lago/api/v1/events/batch"
    base = {"code": "api_call", "properties": {"endpoint": "/x"}}
    seconds = int(at(10).timestamp())
    plus_one = at(20).astimezone(timezone(timedelta(hours=1)))
    events = [
        {**base, "transaction_id": "f-1", "external_subscription_id": "s1", "timestamp": seconds},
        {**base, "transaction_id": "f-2", "external_subscription_id": "s1", "timestamp": seconds + 0.25},
        {
            **base,
            "transaction_id": "f-3",
            "external_subscription_id": "s1",
            "timestamp": f"{seconds}.1234567",
        },
        {
            **base,
            "transaction_id": "f-4",
            "external_subscription_id": "s1",
            "timestamp": plus_one.isoformat(),
        },
        {**base, "transaction_id": "f-5", "external_subscription_id": "s1", "external_customer_id": "acme"},
        {
            **base,
            "transaction_id": "f-6",
            "external_customer_id": "acme",
            "timestamp": None,
            "properties": None,
        },
    ]
    answer = httpx.post(url, json={"events": events}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    shown = {e["transaction_id"]: e for e in answer.json()["events"]}
    iso = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert [shown[f"f-{i}"]["timestamp"] for i in (1, 2, 3, 4)] == [
        f"{iso}.000000Z",
        f"{iso}.250000Z",
        f"{iso}.123456Z",  # digits beyond microseconds are truncated, as for /v1 events
        at(20).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    ]
    assert shown["f-5"]["lago_customer_id"] == "acme"  # external_customer_id wins
    assert shown["f-6"]["timestamp"] == shown["f-6"]["created_at"]  # absent: the receive time
    assert shown["f-6"]["properties"] == {}

    # A property the catalog refuses: accepted here, quarantined by the pipeline, still found by its id.
    refused = {
        **base,
        "transaction_id": "f-7",
        "external_subscription_id": "s1",
        "properties": {"endpoint": "/x", "method": "FETCH"},
    }
    assert (
        httpx.post(f"{gateway_url}/lago/api/v1/events", json={"event": refused}, headers=AUTH).status_code
        == 200
    )
    run_drain(nats_server.url, database_url, catalog)
    found = client(gateway_url, admin_key).events.find("f-7")
    assert (found.transaction_id, found.properties["method"]) == ("f-7", "FETCH")
    ours = httpx.get(f"{gateway_url}/v1/events/lago:f-7", headers=AUTH).json()
    assert ours["state"] == "quarantined" and ours["reasons"]
    later = (NOW + timedelta(hours=1)).isoformat()  # f-5 and f-6 are stamped with their receive time
    # f-6 (no properties: endpoint is required) and f-7 are quarantined, not counted
    assert usage(gateway_url, "api_calls", to=later) == {"s1": 4, "acme": 1}


def test_bad_events_are_refused_whole_in_lagos_shape(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    lago = client(gateway_url, admin_key)
    good = lago_event("ok-1", "s1", 1)
    bad = Event(
        transaction_id="bad-1", external_subscription_id="s1", code="api_call", timestamp="next tuesday"
    )
    with pytest.raises(LagoApiError) as raised:
        lago.events.batch_create(BatchEvent(events=[good, bad]))
    assert raised.value.status_code == 422
    assert raised.value.response == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {"1": {"timestamp": [raised.value.response["error_details"]["1"]["timestamp"][0]]}},
    }
    with pytest.raises(LagoApiError) as raised:
        lago.events.create(Event(transaction_id="", external_subscription_id="s1", code="api_call"))
    assert raised.value.response["error_details"] == {"transaction_id": ["value_is_mandatory"]}
    with pytest.raises(LagoApiError) as raised:
        lago.events.find("never-sent")
    assert raised.value.status_code == 404 and raised.value.response["code"] == "event_not_found"

    url = f"{gateway_url}/lago/api/v1/events"
    answer = httpx.post(url, content=b"{oops", headers={**AUTH, "Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["code"]) == (400, "bad_request")
    far_future = {
        "transaction_id": "ff",
        "external_subscription_id": "s",
        "code": "api_call",
        "timestamp": 4e9,
    }
    answer = httpx.post(url, json={"event": far_future}, headers=AUTH)
    assert answer.status_code == 422 and "timestamp" in answer.json()["error_details"]
    answer = httpx.post(url, json={"event": {"transaction_id": "t", "code": "api_call"}}, headers=AUTH)
    assert answer.json()["error_details"] == {"external_subscription_id": ["value_is_mandatory"]}
    answer = httpx.post(url, content=b"{}", headers={**AUTH, "Content-Type": "text/plain"})
    assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type")

    with pytest.raises(LagoApiError) as raised:
        client(gateway_url, "mk_live_not-a-key").events.create(good)
    assert raised.value.status_code == 401 and raised.value.response["code"] == "unauthorized"
    run_drain(nats_server.url, database_url, catalog)
    assert httpx.get(f"{gateway_url}/v1/events/lago:ok-1", headers=AUTH).status_code == 404


def test_a_lago_id_and_an_openmeter_id_with_the_same_raw_string_are_two_events(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    import openmeter

    client(gateway_url, admin_key).events.create(lago_event("same-1", "cust", 2))
    openmeter.Client(endpoint=f"{gateway_url}/openmeter", token=admin_key).events.ingest_event(
        {
            "specversion": "1.0",
            "id": "same-1",
            "source": "same-1",
            "type": "api_call",
            "subject": "cust",
            "time": at(2).isoformat(),
            "data": {"endpoint": "/v1/users"},
        }
    )
    httpx.post(
        f"{gateway_url}/v1/events",
        json={
            "id": "same-1",
            "event_type": "api_call",
            "customer_id": "cust",
            "timestamp": at(2).isoformat(),
            "properties": {"endpoint": "/v1/users"},
        },
        headers=AUTH,
    ).raise_for_status()
    run_drain(nats_server.url, database_url, catalog)
    assert usage(gateway_url, "api_calls") == {"cust": 3}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 100_000, 400),  # deep nesting
        (b'{"event": {"transaction_id": "\xff\xfe", "code": "api_call", "external_customer_id": "c"}}', 400),
        (b'{"event": {"transaction_id": "t", "code": "api_call", "external_customer_id": "c\\u0000"}}', 422),
        (
            b'{"event": {"transaction_id": "t", "code": "api_call", "external_customer_id": "c", "properties": {"a": "\\u0000"}}}',
            422,
        ),
        (
            b'{"event": {"transaction_id": "t", "code": "api_call", "external_customer_id": "c", "timestamp": 1e400}}',
            400,
        ),
        (b'{"event": {"transaction_id": 5, "code": [], "external_customer_id": {}, "timestamp": true}}', 422),
        (
            b'{"event": {"transaction_id": "t", "code": "api_call", "external_customer_id": "c", "timestamp": "99999999999999"}}',
            422,
        ),
        (b'{"events": "not a list"}', 422),
        (b'"just a string"', 400),
    ],
)
def test_hostile_bodies_are_a_4xx_in_lagos_shape(gateway_url, body, status):
    path = "events/batch" if body.startswith(b'{"events"') else "events"
    answer = httpx.post(
        f"{gateway_url}/lago/api/v1/{path}",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == status and answer.json()["code"]
