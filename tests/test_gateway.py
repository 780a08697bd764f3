"""The gateway's HTTP API against real JetStream and PostgreSQL: every status code and rule of the contract."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.testclient import TestClient

from ingest_gateway import status as status_module
from ingest_gateway.app import create_app
from meter_platform.capture import jetstream
from meter_platform.config import CONSUMER_NAME, STREAM_NAME, DrainSettings
from meter_platform.runtime.servers import start_nats
from tests.helpers import AUTH, api_call, backlog, limit_stream, publish, query, run_drain, scalar

pytestmark = pytest.mark.usefixtures("clean")

# Everything is in the stream before a drain starts, so a short idle time loses nothing.
QUICK_DRAIN = DrainSettings(batch_size=200, fetch_timeout=0.2, max_seconds=30, idle_seconds=0.3)
MICROS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
NDJSON = "application/x-ndjson"
# A recent day: events older than the allowed lateness (35 days by default) are quarantined as too late.
DAY = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()


def recent(time_of_day: str) -> str:
    """An RFC 3339 timestamp on DAY, e.g. recent("10:30:45.123456Z")."""
    return f"{DAY}T{time_of_day}"


def on_day(hour: int, minute: int, second: int, micro: int = 0) -> datetime:
    return datetime.fromisoformat(DAY).replace(
        hour=hour, minute=minute, second=second, microsecond=micro, tzinfo=UTC
    )


@pytest.fixture
def client(clean: None, settings, catalog) -> Iterator[TestClient]:
    """The gateway with its lifespan running, on an empty stream and empty tables."""
    with TestClient(
        create_app(settings, catalog), raise_server_exceptions=False, headers=AUTH
    ) as test_client:
        yield test_client


def post(client: TestClient, body: Any, content_type: str = "application/json"):
    """POST /v1/events with a raw body (bytes/str) or a value encoded as JSON."""
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post("/v1/events", content=data, headers={"Content-Type": content_type})


def drain(nats_server, database_url, catalog):
    """Move everything accepted so far into PostgreSQL."""
    return run_drain(nats_server.url, database_url, catalog, settings=QUICK_DRAIN)


def assert_error_shape(response, status: int) -> dict[str, Any]:
    """The contract's error answer: a JSON object with a one-sentence error and a details list."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"].strip()
    assert isinstance(body["details"], list)
    return body


def assert_retry_after(response) -> None:
    assert int(response.headers["Retry-After"]) > 0


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def start_nats_again(nats_server) -> None:
    """Start the (stopped) session nats-server again on its port and file store."""
    port = int(nats_server.url.rsplit(":", 1)[1])
    nats_server.server = start_nats(nats_server.store, port=port)


def stored_ids(database_url: str) -> list[str]:
    return [r[0] for r in query(database_url, "SELECT id FROM usage_events ORDER BY id")]


# --- POST /v1/events: accepted ---------------------------------------------------------------------


def test_single_object_gets_a_uuid7_id_and_is_durable_at_202(client, nats_server):
    response = post(client, api_call(None))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 1 and len(body["ids"]) == 1
    generated = uuid.UUID(body["ids"][0])
    assert str(generated) == body["ids"][0]
    assert generated.version == 7 and generated.variant == uuid.RFC_4122
    # 202 means it is in the stream already.
    assert backlog(nats_server.url).last_seq == 1


def test_array_keeps_ids_in_request_order_and_fills_missing_ones(client, nats_server, database_url, catalog):
    events = [api_call("given-b"), api_call(None), api_call("given-a"), api_call(None, customer="c2")]
    response = post(client, events)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert response.json()["accepted"] == 4 and len(ids) == 4
    assert ids[0] == "given-b" and ids[2] == "given-a"
    assert all(uuid.UUID(i).version == 7 for i in (ids[1], ids[3]))
    assert ids[1] != ids[3]
    assert backlog(nats_server.url).last_seq == 1  # one request, one message
    drain(nats_server, database_url, catalog)
    assert stored_ids(database_url) == sorted(ids)
    assert scalar(database_url, "SELECT customer_id FROM usage_events WHERE id = %s", (ids[3],)) == "c2"


def test_ndjson_body_is_accepted_line_by_line(client, nats_server, database_url, catalog):
    lines = [
        json.dumps(api_call("n1")),
        "",
        json.dumps(api_call(None, customer="c9")),
        json.dumps(api_call("n3")),
    ]
    response = post(client, "\n".join(lines) + "\n", NDJSON)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert response.json()["accepted"] == 3
    assert ids[0] == "n1" and ids[2] == "n3" and uuid.UUID(ids[1]).version == 7
    # NDJSON with a charset parameter and the application/ndjson spelling are the same thing.
    response = post(client, json.dumps(api_call("n4")), "application/x-ndjson; charset=utf-8")
    assert response.status_code == 202, response.text
    drain(nats_server, database_url, catalog)
    assert stored_ids(database_url) == sorted([*ids, "n4"])


def test_boundary_lengths_are_accepted(client, nats_server, database_url, catalog):
    event = {
        "event_type": "api_call",
        "customer_id": "c" * 256,
        "id": "i" * 128,
        "properties": {"endpoint": "/x"},
        "metadata": {"source": "test"},
    }
    longest_type = {"event_type": "t" * 128, "customer_id": "c", "id": "long-type"}
    response = post(client, [event, longest_type])
    assert response.status_code == 202, response.text
    assert response.json()["ids"] == ["i" * 128, "long-type"]


def test_timestamps_keep_microseconds_truncated_not_rounded(
    client, nats_server, database_url, catalog, monkeypatch
):
    monkeypatch.setenv("METER_MAX_LATENESS_DAYS", "3650")  # the drain may store events from 2025
    events = [
        api_call("nanos", ts="2025-07-24T10:30:45.123456789+02:00"),
        api_call("nines", ts="2025-07-24T23:59:59.999999999Z"),
        api_call("one-digit", ts="2025-07-24T10:30:45.1-05:30"),
        api_call("no-fraction", ts="2025-07-24T10:30:45z"),
    ]
    assert post(client, events).status_code == 202
    drain(nats_server, database_url, catalog)
    stored = dict(query(database_url, "SELECT id, ts FROM usage_events"))
    assert stored["nanos"] == datetime(2025, 7, 24, 8, 30, 45, 123456, tzinfo=UTC)
    # Truncated: rounding would move it into the next day (and the next minute window).
    assert stored["nines"] == datetime(2025, 7, 24, 23, 59, 59, 999999, tzinfo=UTC)
    assert stored["one-digit"] == datetime(2025, 7, 24, 16, 0, 45, 100000, tzinfo=UTC)
    assert stored["no-fraction"] == datetime(2025, 7, 24, 10, 30, 45, tzinfo=UTC)
    got = client.get("/v1/events/nanos").json()
    assert got["timestamp"] == "2025-07-24T08:30:45.123456Z"
    # The same on a recent day, under the default lateness.
    assert post(client, api_call("recent-nanos", ts=recent("00:30:45.123456789+02:00"))).status_code == 202
    drain(nats_server, database_url, catalog)
    got = client.get("/v1/events/recent-nanos").json()
    assert got["state"] == "stored"
    assert parse_time(got["timestamp"]) == on_day(0, 30, 45, 123456) - timedelta(hours=2)


def test_default_timestamp_is_the_receive_time(client, nats_server, database_url, catalog):
    before = datetime.now(UTC)
    response = post(client, [api_call("no-ts", ts=None), api_call("with-ts", ts=recent("10:30:45.123456Z"))])
    after = datetime.now(UTC)
    assert response.status_code == 202
    drain(nats_server, database_url, catalog)
    rows = {r[0]: r[1:] for r in query(database_url, "SELECT id, ts, received_at FROM usage_events")}
    ts, received = rows["no-ts"]
    assert ts == received
    assert before - timedelta(milliseconds=1) <= received <= after + timedelta(milliseconds=1)
    # received_at is the gateway's clock with microseconds, the same for the whole request.
    assert rows["with-ts"][1] == received
    assert rows["with-ts"][0] == on_day(10, 30, 45, 123456)
    got = client.get("/v1/events/no-ts").json()
    assert MICROS.match(got["received_at"]) and parse_time(got["received_at"]) == received
    assert got["timestamp"] == got["received_at"]


def test_far_past_timestamp_does_not_wedge_the_pipeline(client, nats_server, database_url, catalog):
    # RFC 3339 allows years 0000-9999: what the gateway accepts, the pipeline must be able to take
    # (stored, or quarantined as too late), and the answer must still be RFC 3339.
    response = post(client, [api_call("antique", ts="0099-01-01T00:00:00.5Z"), api_call("modern")])
    assert response.status_code == 202, response.text
    counts = drain(nats_server, database_url, catalog)
    assert counts.events == 2 and counts.stored >= 1
    got = client.get("/v1/events/antique").json()
    assert got["state"] in ("stored", "quarantined")
    assert got["timestamp"] == "0099-01-01T00:00:00.500000Z"


# --- POST /v1/events: rejected ---------------------------------------------------------------------


def _future(minutes: float) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


_DROP = object()


def _with(**fields: Any) -> dict[str, Any]:
    """An api_call event with fields replaced (or dropped with _DROP)."""
    event = api_call("x")
    for key, value in fields.items():
        if value is _DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return event


BAD_SINGLE_EVENTS = {
    "event_type missing": (_with(event_type=_DROP), "event_type"),
    "event_type empty": (_with(event_type=""), "event_type"),
    "event_type too long": (_with(event_type="t" * 129), "event_type"),
    "event_type not a string": (_with(event_type=7), "event_type"),
    "customer_id missing": (_with(customer_id=_DROP), "customer_id"),
    "customer_id empty": (_with(customer_id=""), "customer_id"),
    "customer_id too long": (_with(customer_id="c" * 257), "customer_id"),
    "id empty": (_with(id=""), "id"),
    "id too long": (_with(id="i" * 129), "id"),
    "id not a string": (_with(id=12), "id"),
    "timestamp without offset": (_with(timestamp="2025-07-24T10:30:45.123"), "timestamp"),
    "timestamp date only": (_with(timestamp="2025-07-24"), "timestamp"),
    "timestamp words": (_with(timestamp="yesterday"), "timestamp"),
    "timestamp offset without colon": (_with(timestamp="2025-07-24T10:30:45+0200"), "timestamp"),
    "timestamp ten fraction digits": (_with(timestamp="2025-07-24T10:30:45.1234567891Z"), "timestamp"),
    "timestamp month 13": (_with(timestamp="2025-13-24T10:30:45Z"), "timestamp"),
    "timestamp not a string": (_with(timestamp=1721816445), "timestamp"),
    "timestamp before year 1 in UTC": (_with(timestamp="0001-01-01T00:00:00+01:00"), "timestamp"),
    "timestamp after 9999 in UTC": (_with(timestamp="9999-12-31T23:59:59-01:00"), "timestamp"),
    "timestamp a day ahead": (_with(timestamp=_future(24 * 60)), "timestamp"),
    "properties an array": (_with(properties=[1, 2]), "properties"),
    "properties a string": (_with(properties="endpoint=/x"), "properties"),
    "properties null": (_with(properties=None), "properties"),
    "metadata not an object": (_with(metadata=["m"]), "metadata"),
}


@pytest.mark.parametrize(("event", "field"), list(BAD_SINGLE_EVENTS.values()), ids=list(BAD_SINGLE_EVENTS))
def test_each_field_rule_rejects_with_400(client, nats_server, event, field):
    for body in (event, [api_call("good"), event]):
        response = post(client, body)
        details = assert_error_shape(response, 400)["details"]
        index = 0 if isinstance(body, dict) else 1
        assert len(details) == 1, details
        assert details[0]["index"] == index and details[0]["field"] == field
        assert isinstance(details[0]["message"], str) and details[0]["message"]
    response = post(client, json.dumps(event) + "\n", NDJSON)
    assert assert_error_shape(response, 400)["details"][0]["field"] == field
    assert backlog(nats_server.url).last_seq == 0


def test_timestamp_up_to_five_minutes_ahead_is_accepted(client):
    assert post(client, api_call("soon", ts=_future(4))).status_code == 202
    details = assert_error_shape(post(client, api_call("later", ts=_future(6))), 400)["details"]
    assert [(d["index"], d["field"]) for d in details] == [(0, "timestamp")]


BAD_BODIES = {
    "invalid JSON": (b'{"event_type": "api_call", "customer_id": ', "application/json"),
    "not UTF-8": (b"\xff\xfe\x00", "application/json"),
    "empty body": (b"", "application/json"),
    "whitespace body": (b"  \n ", "application/json"),
    "empty array": (b"[]", "application/json"),
    "number out of range": (
        b'{"event_type": "api_call", "customer_id": "c", "properties": {"n": 1e400}}',
        "application/json",
    ),
    "a JSON number": (b"42", "application/json"),
    "a JSON string": (b'"event"', "application/json"),
    "null": (b"null", "application/json"),
    "array of non-objects": (b'[1, "two", null, [3]]', "application/json"),
    "empty NDJSON": (b"\n\n", NDJSON),
    "bad NDJSON line": (json.dumps(api_call("a")).encode() + b"\n{not json}\n", NDJSON),
    "NDJSON line not an object": (json.dumps(api_call("a")).encode() + b"\n[1]\n", NDJSON),
}


@pytest.mark.parametrize(("body", "content_type"), list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_malformed_bodies_are_400_not_500(client, nats_server, body, content_type):
    assert_error_shape(post(client, body, content_type), 400)
    assert backlog(nats_server.url).last_seq == 0


def test_every_bad_item_is_listed_and_nothing_of_the_batch_is_kept(
    client, nats_server, database_url, catalog
):
    assert post(client, api_call("earlier")).status_code == 202
    seq = backlog(nats_server.url).last_seq
    batch = [
        api_call("ok-0"),
        _with(id="bad-1", customer_id=""),
        api_call("ok-2"),
        _with(id="bad-3", timestamp=_future(60)),
        api_call("ok-4"),
        "not an object",
        _with(id="bad-6", event_type=_DROP, properties=[]),
    ]
    details = assert_error_shape(post(client, batch), 400)["details"]
    assert [(d["index"], d["field"]) for d in details if d["index"] != 6] == [
        (1, "customer_id"),
        (3, "timestamp"),
        (5, ""),
    ]
    assert {d["index"] for d in details} == {1, 3, 5, 6}
    assert all(isinstance(d["message"], str) and d["message"] for d in details)

    ndjson = "\n".join(
        json.dumps(e) for e in [api_call("n0"), _with(id=""), api_call("n2"), _with(properties=5)]
    )
    details = assert_error_shape(post(client, ndjson, NDJSON), 400)["details"]
    assert [(d["index"], d["field"]) for d in details] == [(1, "id"), (3, "properties")]

    assert backlog(nats_server.url).last_seq == seq  # the stream did not move
    drain(nats_server, database_url, catalog)
    assert stored_ids(database_url) == ["earlier"]


def test_body_over_the_size_limit_is_413(nats_server, database_url, catalog, settings, clean):
    small = dataclasses.replace(settings, max_body_bytes=1000)
    with TestClient(create_app(small, catalog), raise_server_exceptions=False, headers=AUTH) as client:
        big = json.dumps([api_call(f"big-{i}") for i in range(10)])
        assert len(big) > 1000
        assert_error_shape(post(client, big), 413)
        # Without a Content-Length (chunked upload), the limit holds while streaming.
        chunks = (big[i : i + 100].encode() for i in range(0, len(big), 100))
        response = client.post("/v1/events", content=chunks, headers={"Content-Type": "application/json"})
        assert_error_shape(response, 413)
        assert_error_shape(
            post(client, "\n".join(json.dumps(api_call(f"l{i}")) for i in range(10)), NDJSON), 413
        )
        assert backlog(nats_server.url).last_seq == 0
        small_body = json.dumps(api_call("fits"))
        assert len(small_body) <= 1000
        assert post(client, small_body).status_code == 202


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
    ],
)
def test_unsupported_content_type_is_415(client, nats_server, content_type):
    assert_error_shape(post(client, json.dumps(api_call("x")), content_type), 415)
    assert backlog(nats_server.url).last_seq == 0


def test_form_post_is_415(client):
    assert_error_shape(client.post("/v1/events", data={"event_type": "api_call", "customer_id": "c1"}), 415)


# --- 503: JetStream cannot take the events ---------------------------------------------------------


def test_503_while_nats_is_down_then_the_gateway_recovers(client, nats_server, database_url, catalog):
    assert post(client, api_call("before")).status_code == 202
    nats_server.server.stop()
    try:
        response = post(client, api_call("during"))
        assert_error_shape(response, 503)
        assert_retry_after(response)
        response = client.get("/readyz")
        assert response.status_code == 503
        assert_retry_after(response)
        assert client.get("/healthz").status_code == 200
    finally:
        start_nats_again(nats_server)

    def accepted() -> bool:
        response = post(client, api_call("after"))
        assert response.status_code in (202, 503), response.text
        return response.status_code == 202

    wait_until(accepted)
    assert client.get("/readyz").status_code == 200
    drain(nats_server, database_url, catalog)
    assert {"before", "after"} <= set(stored_ids(database_url))


def test_503_when_the_stream_is_full_and_nothing_accepted_is_lost(client, nats_server, database_url, catalog):
    limit_stream(nats_server.url, 2)
    assert post(client, [api_call("f1"), api_call("f2")]).status_code == 202
    assert post(client, api_call("f3")).status_code == 202
    response = post(client, [api_call("f4"), api_call(None)])
    assert_error_shape(response, 503)
    assert_retry_after(response)
    ids = response.json()["details"][0]["ids"]  # a retry can reuse them, the generated one included
    assert ids[0] == "f4" and uuid.UUID(ids[1]).version == 7
    assert backlog(nats_server.url).last_seq == 2
    counts = drain(nats_server, database_url, catalog)
    assert (counts.events, counts.stored) == (3, 3)
    assert stored_ids(database_url) == ["f1", "f2", "f3"]
    # Drained (a work queue forgets what was committed): there is room again.
    assert post(client, [api_call("f4"), api_call("f5")]).status_code == 202


# --- GET /v1/events/{id} ---------------------------------------------------------------------------


def test_get_stored_event(client, nats_server, database_url, catalog):
    event = api_call(
        "order/42 é", customer="cust-7", ts=recent("10:30:45.123456789+02:00"), bytes_transferred=99
    )
    event["metadata"] = {"sdk": "py"}
    before = datetime.now(UTC)
    assert post(client, event).status_code == 202
    drain(nats_server, database_url, catalog)
    response = client.get("/v1/events/order%2F42%20%C3%A9")
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["state"] == "stored"
    assert got["id"] == "order/42 é" and got["event_type"] == "api_call" and got["customer_id"] == "cust-7"
    assert got["timestamp"] == f"{DAY}T08:30:45.123456Z"
    assert MICROS.match(got["received_at"])
    assert parse_time(got["received_at"]) >= before - timedelta(milliseconds=1)
    assert got["properties"] == event["properties"]
    assert got["metadata"] == {"sdk": "py"}


def test_get_quarantined_event_has_reasons(client, nats_server, database_url, catalog):
    assert post(client, api_call("q1", method="FETCH", ts=recent("10:30:45.123456Z"))).status_code == 202
    drain(nats_server, database_url, catalog)
    response = client.get("/v1/events/q1")
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["state"] == "quarantined"
    assert got["id"] == "q1" and got["customer_id"] == "c1" and got["event_type"] == "api_call"
    assert got["timestamp"] == f"{DAY}T10:30:45.123456Z"
    assert MICROS.match(got["received_at"])
    assert got["properties"]["method"] == "FETCH"
    assert [r["field"] for r in got["reasons"]] == ["properties.method"]
    assert all(r["message"] for r in got["reasons"])


@pytest.mark.parametrize("event_id", ["p1", 'with "quotes"', "back\\slash", "ünï/cödé"])
def test_get_pending_event(client, nats_server, event_id):
    assert post(client, [api_call("other"), api_call(event_id, customer="c3", ts=None)]).status_code == 202
    response = client.get("/v1/events/" + quote(event_id, safe=""))
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["state"] == "pending"
    assert got["id"] == event_id and got["customer_id"] == "c3" and got["event_type"] == "api_call"
    assert MICROS.match(got["timestamp"]) and MICROS.match(got["received_at"])
    assert got["timestamp"] == got["received_at"]


def test_get_pending_event_published_straight_to_nats(client, nats_server):
    # Services may publish with the id in the body, or only in the Nats-Msg-Id header.
    publish(
        nats_server.url, api_call("direct-body", ts=recent("10:30:45.123456789+02:00")), msg_id="direct-body"
    )
    publish(nats_server.url, api_call(None, customer="c5", ts=None), msg_id="direct-header")
    got = client.get("/v1/events/direct-body").json()
    assert got["state"] == "pending" and got["id"] == "direct-body"
    assert got["timestamp"] == f"{DAY}T08:30:45.123456Z"
    assert MICROS.match(got.get("received_at") or ""), got
    response = client.get("/v1/events/direct-header")
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["state"] == "pending" and got["id"] == "direct-header" and got["customer_id"] == "c5"
    assert MICROS.match(got.get("received_at") or ""), got
    assert got["timestamp"] == got["received_at"]


def test_event_published_straight_to_nats_without_any_id_is_found_pending_under_its_stored_id(
    client, nats_server, database_url, catalog
):
    # No id in the body and no Nats-Msg-Id: the pipeline stores these as nats-<seq>-<index>, and the
    # lookup of pending events must read the message the same way.
    publish(nats_server.url, [api_call(None, customer="c6", ts=None), api_call(None, customer="c7", ts=None)])
    seq = backlog(nats_server.url).last_seq
    for index, customer in enumerate(("c6", "c7")):
        response = client.get(f"/v1/events/nats-{seq}-{index}")
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["state"] == "pending" and got["customer_id"] == customer and got["stream_seq"] == seq
    drain(nats_server, database_url, catalog)
    stored = client.get(f"/v1/events/nats-{seq}-1").json()
    assert stored["state"] == "stored" and stored["customer_id"] == "c7"


def test_get_unknown_event_is_404(client, nats_server):
    assert post(client, api_call("known")).status_code == 202
    body = assert_error_shape(client.get("/v1/events/never-sent"), 404)
    assert body["error"]
    assert client.get("/v1/events/known").status_code == 200
    # A rejected batch's id was never accepted either.
    assert post(client, [api_call("rejected"), _with(customer_id="")]).status_code == 400
    assert_error_shape(client.get("/v1/events/rejected"), 404)


def test_get_event_with_an_id_postgres_cannot_hold_is_404(client):
    assert_error_shape(client.get("/v1/events/nul%00byte"), 404)


# --- text PostgreSQL cannot hold ------------------------------------------------------------------

NUL_PLACES = {
    "customer_id": lambda e: e.update(customer_id="c\x001"),
    "id": lambda e: e.update(id="nul\x00id"),
    "event_type": lambda e: e.update(event_type="api\x00call"),
    "property value": lambda e: e["properties"].update(endpoint="/v1/\x00users"),
    "property key": lambda e: e["properties"].update({"k\x00ey": 1}),
    "metadata": lambda e: e.update(metadata={"note": "\x00"}),
}


@pytest.mark.parametrize("place", list(NUL_PLACES.values()), ids=list(NUL_PLACES))
def test_nul_characters_are_refused_or_quarantined_never_wedge_the_pipeline(
    client, nats_server, database_url, catalog, place
):
    bad = api_call("nul-event")
    place(bad)
    response = post(client, [api_call("fine-1"), bad])
    if response.status_code == 400:
        details = response.json()["details"]
        assert [d["index"] for d in details] == [1]
        assert backlog(nats_server.url).last_seq == 0
    else:
        # Accepted: then the pipeline must take it (quarantine at worst) and carry on.
        assert response.status_code == 202, response.text
        counts = drain(nats_server, database_url, catalog)
        assert counts.events == 2 and counts.stored >= 1 and counts.balanced
    assert post(client, api_call("fine-2")).status_code == 202
    drain(nats_server, database_url, catalog)
    assert "fine-2" in stored_ids(database_url)
    assert backlog(nats_server.url).messages == 0


# --- read side ------------------------------------------------------------------------------------


def test_meters_match_the_catalog(client, catalog):
    response = client.get("/v1/meters")
    assert response.status_code == 200
    meters = {m["slug"]: m for m in response.json()["meters"]}
    assert [m["slug"] for m in response.json()["meters"]] == [m.slug for m in catalog.meters]
    assert meters["api_calls"] == {
        "slug": "api_calls",
        "event_type": "api_call",
        "aggregation": "count",
        "value_property": None,
        "group_by": ["endpoint", "method", "region"],
    }
    assert meters["bytes_transferred"] == {
        "slug": "bytes_transferred",
        "event_type": "api_call",
        "aggregation": "sum",
        "value_property": "bytes_transferred",
        "group_by": ["region"],
    }
    for meter in catalog.meters:
        got = meters[meter.slug]
        assert (got["event_type"], got["aggregation"], got["value_property"], got["group_by"]) == (
            meter.event_type,
            meter.aggregation,
            meter.value_property,
            list(meter.group_by),
        )


def test_ingest_status_balances_after_good_duplicate_and_bad_events(
    client, nats_server, database_url, catalog
):
    status = client.get("/v1/ingest/status").json()
    assert status["stream"] == {**status["stream"], "name": STREAM_NAME, "last_seq": 0, "messages": 0}
    assert (
        status["events"]["stored"] == status["events"]["duplicates"] == status["events"]["quarantined"] == 0
    )

    accepted = 0
    for body in (
        [api_call("s1"), api_call("s2"), api_call(None)],
        api_call("s1"),  # a resend through the gateway
        [api_call("s2"), api_call("bad", method="FETCH"), api_call(None, bytes_transferred=-5)],
        [api_call("s3"), api_call("s3")],  # the same id twice in one request
    ):
        response = post(client, body)
        assert response.status_code == 202
        accepted += response.json()["accepted"]
    assert post(client, [api_call("never"), _with(event_type="")]).status_code == 400
    publish(nats_server.url, api_call("s3"), msg_id="s3")  # the same id straight to NATS
    accepted_total = accepted + 1

    status = client.get("/v1/ingest/status").json()
    assert status["stream"]["last_seq"] == 5 and status["stream"]["messages"] == 5
    assert status["consumer"]["pending"] == 5 and status["consumer"]["ack_floor"] == 0

    drain(nats_server, database_url, catalog)
    status = client.get("/v1/ingest/status")
    assert status.status_code == 200
    status = status.json()
    assert status["stream"]["name"] == STREAM_NAME
    assert status["stream"]["last_seq"] == 5 and status["stream"]["messages"] == 0
    assert status["consumer"]["pending"] == 0 and status["consumer"]["ack_floor"] == 5
    events = status["events"]
    assert (events["stored"], events["duplicates"], events["quarantined"]) == (4, 4, 2)
    assert events["stored"] + events["duplicates"] + events["quarantined"] == accepted_total == 10


def test_healthz_and_readyz(client):
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200, response.text


def test_unknown_route_is_404_and_wrong_method_is_405(client):
    for path in ("/nope", "/v1/event", "/v2/events", "/v1/meters/api_calls/usage/extra"):
        assert_error_shape(client.get(path), 404)
    assert_error_shape(client.post("/v1/nope", json={}), 404)
    for method, path in (
        ("GET", "/v1/events"),
        ("PUT", "/v1/events"),
        ("DELETE", "/v1/events/x"),
        ("POST", "/v1/meters"),
        ("POST", "/v1/ingest/status"),
        ("POST", "/healthz"),
        ("DELETE", "/v1/meters/api_calls/usage"),
    ):
        response = client.request(method, path)
        assert_error_shape(response, 405)
        assert response.headers.get("Allow")


def test_same_id_through_gateway_and_nats_is_counted_once(client, nats_server, database_url, catalog):
    assert post(client, api_call("both-ways", bytes_transferred=10)).status_code == 202
    publish(nats_server.url, api_call("both-ways", bytes_transferred=10), msg_id="both-ways")
    publish(nats_server.url, [api_call("both-ways", bytes_transferred=10)])
    assert post(client, api_call("both-ways", bytes_transferred=10)).status_code == 202
    counts = drain(nats_server, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates) == (4, 1, 3)
    assert scalar(database_url, "SELECT count(*) FROM usage_events") == 1
    week = {"from": f"{DAY}T00:00:00Z", "to": datetime.now(UTC).isoformat()}
    usage = client.get("/v1/meters/api_calls/usage", params=week).json()
    assert [row["value"] for row in usage["data"]] == [1]
    usage = client.get("/v1/meters/bytes_transferred/usage", params=week).json()
    assert [row["value"] for row in usage["data"]] == [10]


# --- staying up: bounded answers, failing publishes, the true backlog ------------------------------


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a PostgreSQL postmaster and its backends), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP a server and every process it started (a frozen host, a stuck disk), SIGCONT after."""
    stopped: list[int] = []
    try:
        os.kill(pid, signal.SIGSTOP)  # first, so that it starts no new backend meanwhile
        stopped.append(pid)
        for child in _process_tree(pid)[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
                stopped.append(child)
        yield
    finally:
        for each in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGCONT)


def timed_get(url: str) -> tuple[httpx.Response, float]:
    """GET with a client timeout well past the bound, and how long the answer took."""
    started = time.monotonic()
    response = httpx.get(url, timeout=10, headers=AUTH)
    return response, time.monotonic() - started


def assert_status_shape(status: dict[str, Any]) -> None:
    """Every contract field of /v1/ingest/status is present (null when unknown)."""
    assert set(status["stream"]) >= {"name", "last_seq", "messages"}
    assert set(status["consumer"]) >= {"pending", "ack_floor", "uncounted"}
    assert set(status["events"]) >= {"stored", "duplicates", "quarantined"}
    assert isinstance(status["degraded"], list)


def test_readyz_and_status_answer_in_time_while_postgres_is_frozen(gateway_url, pg_server):
    assert httpx.get(f"{gateway_url}/readyz", timeout=10).status_code == 200  # the pool is warm
    with frozen(pg_server.process.pid):
        for _ in range(2):  # the second call finds the first still waiting: no pile-up, no hang
            response, took = timed_get(f"{gateway_url}/readyz")
            assert took < 3, took
            body = assert_error_shape(response, 503)
            assert "postgres" in body["error"]
            checks = body["details"][0]
            assert checks["postgres"].startswith("failed") and checks["nats"] == "ok"
        response, took = timed_get(f"{gateway_url}/v1/ingest/status")
        assert took < 3, took
        assert response.status_code == 200, response.text
        status = response.json()
        assert_status_shape(status)
        assert status["degraded"] == ["postgres"]
        assert status["stream"] == {"name": STREAM_NAME, "last_seq": 0, "messages": 0}
        assert status["consumer"]["pending"] == 0 and status["consumer"]["ack_floor"] == 0
        assert status["consumer"]["uncounted"] is None
        assert set(status["events"].values()) == {None}
    wait_until(lambda: httpx.get(f"{gateway_url}/readyz", timeout=10).status_code == 200)
    status = httpx.get(f"{gateway_url}/v1/ingest/status", timeout=10, headers=AUTH).json()
    assert status["degraded"] == [] and status["events"]["stored"] == 0


def test_readyz_and_status_answer_in_time_while_nats_is_frozen(gateway_url, nats_server):
    assert httpx.get(f"{gateway_url}/readyz", timeout=10).status_code == 200
    with frozen(nats_server.server.process.pid):
        response, took = timed_get(f"{gateway_url}/readyz")
        assert took < 3, took
        body = assert_error_shape(response, 503)
        assert "nats" in body["error"]
        assert body["details"][0]["nats"].startswith("failed") and body["details"][0]["postgres"] == "ok"
        response, took = timed_get(f"{gateway_url}/v1/ingest/status")
        assert took < 3, took
        assert response.status_code == 200, response.text
        status = response.json()
        assert_status_shape(status)
        assert status["degraded"] == ["nats"]
        assert status["stream"] == {"name": STREAM_NAME, "last_seq": None, "messages": None}
        assert status["consumer"]["pending"] is None and status["consumer"]["uncounted"] is None
        assert status["events"]["stored"] == 0 and status["events"]["balanced"] is True
    wait_until(lambda: httpx.get(f"{gateway_url}/readyz", timeout=10).status_code == 200)


def test_readyz_is_503_while_publishes_fail_until_the_stream_has_room(
    client, nats_server, database_url, catalog, monkeypatch
):
    assert client.get("/readyz").status_code == 200
    limit_stream(nats_server.url, 1)
    assert post(client, api_call("room-1")).status_code == 202
    assert client.get("/readyz").status_code == 200  # full, but no publish has failed yet
    assert_error_shape(post(client, api_call("room-2")), 503)
    monkeypatch.setattr(status_module, "PUBLISH_FAILURE_HOLD", 0.0)
    # The connection is fine; JetStream refuses writes: not ready, for as long as the stream is full.
    response = client.get("/readyz")
    body = assert_error_shape(response, 503)
    assert_retry_after(response)
    assert "publish" in body["error"]
    checks = body["details"][0]
    assert checks["nats"] == checks["stream"] == checks["postgres"] == "ok"
    assert checks["publish"].startswith("failing") and "full" in checks["publish"]
    # Room again, but the failure is recent: still not ready, until a publish succeeds ...
    drain(nats_server, database_url, catalog)
    monkeypatch.setattr(status_module, "PUBLISH_FAILURE_HOLD", 60.0)
    assert_error_shape(client.get("/readyz"), 503)
    assert post(client, api_call("room-3")).status_code == 202
    assert client.get("/readyz").status_code == 200
    # ... or, with no publish at all (out of rotation), once the stream has room and the hold is over.
    assert_error_shape(post(client, api_call("room-4")), 503)
    assert_error_shape(client.get("/readyz"), 503)
    drain(nats_server, database_url, catalog)
    monkeypatch.setattr(status_module, "PUBLISH_FAILURE_HOLD", 0.0)
    assert client.get("/readyz").status_code == 200


async def _set_ack_wait(url: str, seconds: float) -> None:
    nc = await jetstream.connect(url, name="tests")
    try:
        config = jetstream.consumer_config()
        config.ack_wait = seconds
        await nc.jetstream().add_consumer(STREAM_NAME, config)
    finally:
        await nc.close()


async def _ack_only(url: str, seq: int) -> None:
    """Take the consumer's messages (redelivered) and ack only the one at ``seq``."""
    nc = await jetstream.connect(url, name="tests")
    try:
        sub = await nc.jetstream().pull_subscribe_bind(CONSUMER_NAME, STREAM_NAME)
        for msg in await sub.fetch(10, timeout=3):
            if msg.metadata.sequence.stream == seq:
                await msg.ack()
        await nc.flush()
    finally:
        await nc.close()


def test_status_does_not_show_committed_but_unacked_messages_as_backlog(
    client, nats_server, database_url, catalog
):
    asyncio.run(_set_ack_wait(nats_server.url, 1.0))
    for event_id in ("u1", "u2", "u3"):
        assert post(client, api_call(event_id)).status_code == 202
    consumer = client.get("/v1/ingest/status").json()["consumer"]
    assert consumer["pending"] == consumer["uncounted"] == 3
    # Committed to the ledger, but the acks are lost (as in a NATS disk-full incident).
    with pytest.raises(RuntimeError, match="between commit and ack"):
        run_drain(nats_server.url, database_url, catalog, settings=QUICK_DRAIN, crash_after_commit=True)
    status = client.get("/v1/ingest/status").json()
    assert status["stream"]["messages"] == 3 and status["consumer"]["pending"] == 3
    assert status["consumer"]["uncounted"] == 0 and status["degraded"] == []
    assert status["events"]["stored"] == 3
    assert post(client, api_call("u4")).status_code == 202
    status = client.get("/v1/ingest/status").json()
    assert status["consumer"]["pending"] == 4 and status["consumer"]["uncounted"] == 1
    # A gap in the middle of the stream (seq 2 acked, 1 and 3 not) does not change the count.
    time.sleep(1.2)  # past ack_wait: redelivered
    asyncio.run(_ack_only(nats_server.url, 2))
    status = client.get("/v1/ingest/status").json()
    assert status["stream"]["messages"] == 3 and status["consumer"]["uncounted"] == 1
    time.sleep(1.2)
    drain(nats_server, database_url, catalog)
    status = client.get("/v1/ingest/status").json()
    assert status["stream"]["messages"] == 0 and status["consumer"]["pending"] == 0
    assert status["consumer"]["uncounted"] == 0 and status["events"]["stored"] == 4
