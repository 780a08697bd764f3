"""Stripe's official Python SDK, unchanged but for its base addresses and key, against the real gateway:
v1 and v2 meter events and the session + stream, each answered once durable in JetStream, counted once
however often an identifier is resent (by either API), refused whole with the SDK's own exceptions,
and exact in the usage API once drained into PostgreSQL."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe

from meter_platform.catalog import Catalog, load_catalog
from tests.helpers import backlog, limit_stream, run_drain, scalar

CATALOG_DIR = Path(__file__).parent.parent / "catalogs" / "stripe"
NOW = datetime.now(UTC).replace(microsecond=0)
HOUR_AGO = NOW - timedelta(hours=1)


@pytest.fixture
def catalog() -> Catalog:
    """The example catalog's place taken by one that meters Stripe's `api_requests` by `value`."""
    return load_catalog(CATALOG_DIR)


def client(gateway_url: str, key: str) -> stripe.StripeClient:
    """The SDK pointed at the gateway; no retries of its own, so each call is one request."""
    base = f"{gateway_url}/stripe"
    return stripe.StripeClient(key, base_addresses={"api": base, "meter_events": base}, max_network_retries=0)


def usage(gateway_url: str, key: str, slug: str) -> dict[str, Any]:
    """Total of a meter per customer over the last two days, from our own usage API."""
    params = {
        "from": (NOW - timedelta(days=2)).isoformat(),
        "to": (NOW + timedelta(days=1)).isoformat(),
        "group_by": "customer_id",
    }
    url = f"{gateway_url}/v1/meters/{slug}/usage?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        rows = json.load(answer)["data"]
    return {r["customer_id"]: r["value"] for r in rows if r["value"]}


def published(nats_url: str) -> int:
    """Messages ever published to the stream (each accepted request is one)."""
    return backlog(nats_url).last_seq


def test_v1_meter_event_is_durable_answered_as_stripe_and_counted_once(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    sdk = client(gateway_url, admin_key)
    params: dict[str, Any] = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": "cus_A", "value": "2.5", "model": "large"},
        "identifier": "req-v1-1",
        "timestamp": int(HOUR_AGO.timestamp()),
    }
    event = sdk.v1.billing.meter_events.create(params)
    assert isinstance(event, stripe.billing.MeterEvent)
    assert event.object == "billing.meter_event" and event.identifier == "req-v1-1"
    assert event.event_name == "api_requests" and event.timestamp == int(HOUR_AGO.timestamp())
    assert event.payload.to_dict() == params["payload"] and event.livemode is True
    assert abs(event.created - time.time()) < 60
    assert published(nats_server.url) == 1  # durable before the answer
    sdk.v1.billing.meter_events.create(params)  # a resend: answered alike, counted once
    made = sdk.v1.billing.meter_events.create(
        {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_A", "value": "0.1"}}
    )
    assert made.identifier and made.timestamp == pytest.approx(time.time(), abs=60)
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.stored, counts.duplicates, counts.quarantined) == (2, 1, 0)
    assert Decimal(str(usage(gateway_url, admin_key, "stripe_requests_value")["cus_A"])) == Decimal("2.6")
    row = scalar(database_url, "SELECT properties FROM usage_events WHERE id = 'stripe:req-v1-1'")
    assert row == {"value": 2.5, "model": "large"}  # the customer id is the event's, not a property


def test_v2_event_and_the_session_stream_count_each_identifier_once_across_apis(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    sdk = client(gateway_url, admin_key)
    one = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": "cus_B", "value": "7"},
        "identifier": "req-shared",
        "timestamp": HOUR_AGO.isoformat().replace("+00:00", "Z"),
    }
    event = sdk.v2.billing.meter_events.create(one)
    assert event.object == "v2.billing.meter_event" and event.identifier == "req-shared"
    assert datetime.fromisoformat(event.timestamp) == HOUR_AGO
    # the same identifier by v1 is the same event
    sdk.v1.billing.meter_events.create({**one, "timestamp": int(HOUR_AGO.timestamp())})

    session = sdk.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session" and session.id.startswith("mes_")
    lifetime = datetime.fromisoformat(session.expires_at) - datetime.fromisoformat(session.created)
    assert lifetime == timedelta(minutes=15)
    stream = client(gateway_url, session.authentication_token)
    events = [
        {
            "event_name": "api_requests",
            "identifier": f"s-{i}",
            "payload": {"stripe_customer_id": c, "value": v},
        }
        for i, (c, v) in enumerate([("cus_B", "1"), ("cus_C", "0.25"), ("cus_C", "1e2"), ("cus_B", "3")])
    ]
    assert stream.v2.billing.meter_event_stream.create({"events": events}) is None
    stream.v2.billing.meter_event_stream.create({"events": events[1:3]})  # resent: counted once
    stream.v2.billing.meter_event_stream.create({"events": [{**one, "payload": {**one["payload"]}}]})
    assert published(nats_server.url) == 5

    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates, counts.quarantined) == (9, 5, 4, 0)
    totals = usage(gateway_url, admin_key, "stripe_requests_value")
    assert {k: Decimal(str(v)) for k, v in totals.items()} == {"cus_B": 11, "cus_C": Decimal("100.25")}
    assert usage(gateway_url, admin_key, "stripe_requests") == {"cus_B": 3, "cus_C": 2}


def test_a_retried_request_without_identifier_counts_once(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    """The SDK keeps its Idempotency-Key across its retries: the identifier the gateway makes follows it."""
    sdk = client(gateway_url, admin_key)
    params = {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_D", "value": "4"}}
    first = sdk.v1.billing.meter_events.create(params, {"idempotency_key": "retry-1"})
    again = sdk.v1.billing.meter_events.create(params, {"idempotency_key": "retry-1"})
    other = sdk.v1.billing.meter_events.create(params)  # a new request: a new event
    assert first.identifier == again.identifier != other.identifier
    stream = [{"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_D", "value": "1"}}] * 2
    for _ in range(2):
        sdk.v2.billing.meter_event_stream.create({"events": stream}, {"idempotency_key": "retry-2"})
    run_drain(nats_server.url, database_url, catalog)
    assert usage(gateway_url, admin_key, "stripe_requests_value") == {"cus_D": 10}  # 4 + 4 + 1 + 1


@pytest.mark.parametrize(
    ("api", "params", "param"),
    [
        ("v1", {"payload": {"stripe_customer_id": "c", "value": "1"}}, "event_name"),
        (
            "v1",
            {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "ten"}},
            "payload[value]",
        ),
        (
            "v1",
            {
                "event_name": "api_requests",
                "payload": {"stripe_customer_id": "c", "value": "0.1000000000000000055"},
            },
            "payload[value]",
        ),
        ("v1", {"event_name": "api_requests", "payload": {"value": "1"}}, "payload[stripe_customer_id]"),
        (
            "v1",
            {"event_name": "api_requests", "payload": {"stripe_customer_id": "c"}, "timestamp": 10**11},
            "timestamp",
        ),
        ("v2", {"payload": {"stripe_customer_id": "c", "value": "1"}}, "event_name"),
        (
            "v2",
            {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "NaN"}},
            "payload.value",
        ),
        ("v2", {"event_name": "x" * 129, "payload": {"stripe_customer_id": "c"}}, "event_name"),
        (
            "v2",
            {"event_name": "api_requests", "payload": {"stripe_customer_id": "c"}, "timestamp": "yesterday"},
            "timestamp",
        ),
    ],
)
def test_a_bad_event_raises_the_sdks_invalid_request_error(
    gateway_url, admin_key, nats_server, api, params, param
):
    sdk = client(gateway_url, admin_key)
    service = sdk.v1.billing.meter_events if api == "v1" else sdk.v2.billing.meter_events
    with pytest.raises(stripe.InvalidRequestError) as caught:
        service.create(params)
    assert caught.value.http_status == 400 and caught.value.param == param, caught.value.json_body
    assert published(nats_server.url) == 0


def test_a_stream_with_one_bad_event_keeps_nothing(gateway_url, admin_key, nats_server):
    sdk = client(gateway_url, admin_key)
    good = {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "1"}}
    bad = {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "1,5"}}
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sdk.v2.billing.meter_event_stream.create({"events": [good, good, bad]})
    assert caught.value.param == "events[2].payload.value"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sdk.v2.billing.meter_event_stream.create({"events": []})
    assert caught.value.param == "events"
    assert published(nats_server.url) == 0


def test_a_wrong_key_or_token_is_the_sdks_authentication_error(gateway_url, admin_key, nats_server):
    event = {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "1"}}
    wrong = client(gateway_url, "mk_live_not-a-key")
    with pytest.raises(stripe.AuthenticationError) as caught:
        wrong.v2.billing.meter_event_stream.create({"events": [event]})
    assert caught.value.http_status == 401
    assert caught.value.json_body["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.AuthenticationError):
        wrong.v1.billing.meter_events.create(event)
    with pytest.raises(stripe.AuthenticationError):
        wrong.v2.billing.meter_event_session.create()
    assert published(nats_server.url) == 0


def new_key(gateway_url: str, admin_key: str, **body: Any) -> str:
    """A new API key made through POST /v1/keys."""
    request = urllib.request.Request(
        f"{gateway_url}/v1/keys",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["key"]


def test_keys_that_may_not_send_are_the_sdks_permission_error(gateway_url, admin_key, nats_server):
    own = {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_X", "value": "1"}}
    other = {"event_name": "api_requests", "payload": {"stripe_customer_id": "cus_Y", "value": "1"}}
    reader = client(gateway_url, new_key(gateway_url, admin_key, scopes=["read"]))
    with pytest.raises(stripe.PermissionError) as caught:  # refused by the key checks
        reader.v1.billing.meter_events.create(own)
    assert caught.value.http_status == 403
    bound = client(gateway_url, new_key(gateway_url, admin_key, scopes=["ingest"], customer_id="cus_X"))
    with pytest.raises(stripe.PermissionError):  # refused when the events are admitted
        bound.v2.billing.meter_event_stream.create({"events": [own, other]})
    assert published(nats_server.url) == 0
    bound.v2.billing.meter_event_stream.create({"events": [own]})
    assert bound.v1.billing.meter_events.create(own).payload.stripe_customer_id == "cus_X"
    assert published(nats_server.url) == 2


def test_events_jetstream_cannot_keep_are_the_sdks_api_error_with_retry_after(
    gateway_url, admin_key, nats_server
):
    limit_stream(nats_server.url, 1)
    sdk = client(gateway_url, admin_key)
    event = {"event_name": "api_requests", "payload": {"stripe_customer_id": "c", "value": "1"}}
    sdk.v2.billing.meter_events.create(event)
    with pytest.raises(stripe.APIError) as caught:
        sdk.v2.billing.meter_events.create({**event, "identifier": "full"})
    assert caught.value.http_status == 503 and caught.value.headers["retry-after"]
    assert caught.value.json_body["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"event_name=%ff&payload[stripe_customer_id]=c", None),  # invalid UTF-8 once decoded
        (b"event_name=a&payload[stripe_customer_id]=c%00", "payload[stripe_customer_id]"),
        (b"event_name=a&payload[stripe_customer_id]=c&payload[a][b]=1", "payload[a][b]"),
        (b"event_name=a&payload[stripe_customer_id]=c&customer=c", "customer"),
    ],
)
def test_a_form_stripe_would_not_send_is_a_400_in_stripes_shape(
    gateway_url, admin_key, nats_server, body, param
):
    request = urllib.request.Request(
        f"{gateway_url}/stripe/v1/billing/meter_events",
        data=body,
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    error = json.load(caught.value)["error"]
    assert error["type"] == "invalid_request_error" and error.get("param") == param, error
    assert published(nats_server.url) == 0
