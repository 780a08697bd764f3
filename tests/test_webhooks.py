"""POST /v1/webhooks/{source} against the real gateway, JetStream and PostgreSQL: Stripe-, GitHub- and
Svix-style deliveries signed with real HMACs (Stripe's header by Stripe's own SDK) are stored exactly
once, redeliveries are not counted twice, forged and stale ones are refused and counted, a fan-out
makes one event per item, and a signed delivery that maps to nothing is quarantined with its reasons."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.runtime.servers import start_nats
from tests.helpers import AUTH, RECENT_TS, backlog, query, run_drain, scalar
from tests.test_webhook_mapping import github_signature, stripe_signature, svix_signature

WEBHOOKS_YAML = Path(__file__).parent / "catalogs" / "webhooks" / "webhooks.yaml"
STRIPE_SECRET = "whsec_tests_stripe_0123456789"
GITHUB_SECRET = "tests github secret"
SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_OLD_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The example catalog with the tests' webhooks.yaml (overrides conftest's for this module)."""
    directory = tmp_path_factory.mktemp("webhooks") / "catalog"
    shutil.copytree(EXAMPLE_CATALOG_DIR, directory)
    shutil.copy(WEBHOOKS_YAML, directory / "webhooks.yaml")
    return load_catalog(directory)


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway reads the sources' secrets from its environment (this process)."""
    monkeypatch.setenv("TEST_STRIPE_SECRET", STRIPE_SECRET)
    monkeypatch.setenv("TEST_GITHUB_SECRET", GITHUB_SECRET)
    monkeypatch.setenv("TEST_SVIX_SECRET", SVIX_SECRET)
    monkeypatch.setenv("TEST_SVIX_SECRET_OLD", SVIX_OLD_SECRET)
    monkeypatch.delenv("TEST_NEVER_SET_SECRET", raising=False)


#: The shared 2-core test machine can be slow: httpx's default of 5 s is too tight for a loaded box.
TIMEOUT = 60.0


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT, **kwargs)


def rejected(source: str, reason: str) -> float:
    """meter_webhook_rejected_total{source, reason} in the default registry (the gateway runs here)."""
    return (
        REGISTRY.get_sample_value("meter_webhook_rejected_total", {"source": source, "reason": reason}) or 0.0
    )


def stripe_invoice(event_id: str, lines: list[Any], customer: str = "cus_42") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "invoice.paid",
            "created": int(time.time()) - 30,
            "data": {"object": {"object": "invoice", "customer": customer, "lines": {"data": lines}}},
        }
    ).encode()


def line(endpoint: str, quantity: int) -> dict[str, Any]:
    return {"object": "line_item", "quantity": quantity, "metadata": {"endpoint": endpoint}}


def send_stripe(
    url: str, body: bytes, *, timestamp: int | None = None, secret: str = STRIPE_SECRET
) -> httpx.Response:
    headers = {
        "Stripe-Signature": stripe_signature(secret, body, timestamp),
        "Content-Type": "application/json",
    }
    return post(f"{url}/v1/webhooks/stripe", content=body, headers=headers)


def send_github(url: str, body: bytes, delivery: str, secret: str = GITHUB_SECRET) -> httpx.Response:
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": github_signature(secret, body),
        "Content-Type": "application/json",
    }
    return post(f"{url}/v1/webhooks/github", content=body, headers=headers)


def send_svix(url: str, body: bytes, msg_id: str, *, signatures: list[str] | None = None) -> httpx.Response:
    ts = str(int(time.time()))
    sigs = signatures or [svix_signature(SVIX_SECRET, msg_id, ts, body)]
    headers = {"svix-id": msg_id, "svix-timestamp": ts, "svix-signature": " ".join(sigs)}
    return post(f"{url}/v1/webhooks/svix", content=body, headers=headers)


def stored(database_url: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    rows = query(database_url, "SELECT id, event_type, customer_id, properties FROM usage_events")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def ledger(database_url: str) -> tuple[int, int, int, int]:
    return tuple(  # type: ignore[return-value]
        scalar(database_url, f"SELECT coalesce(sum({c}), 0) FROM ingest_messages")
        for c in ("events", "stored", "duplicates", "quarantined")
    )


def test_stripe_github_and_svix_deliveries_are_stored_once_and_redeliveries_are_duplicates(
    gateway_url, nats_server, database_url, catalog
):
    invoice = stripe_invoice("evt_1", [line("/v1/a", 100), line("/v1/b", 200), line("/v1/c", 300)])
    push = json.dumps({"ref": "refs/heads/main", "repository": {"owner": {"login": "octo-org"}}}).encode()
    svix_body = json.dumps(
        {
            "type": "message.sent",
            "data": {
                "account_id": "acc_7",
                "sent_at": RECENT_TS,
                "message": {"channel": "sms", "segments": 2},
            },
        }
    ).encode()
    github_delivery = str(uuid.uuid4())

    answers = [
        send_stripe(gateway_url, invoice),
        send_github(gateway_url, push, github_delivery),
        send_svix(gateway_url, svix_body, "msg_2abc"),
    ]
    assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]
    stripe_ids = [f"webhook:stripe:evt_1:{i}" for i in range(3)]  # the fan-out: one event per line
    assert answers[0].json() == {"accepted": 3, "ids": stripe_ids}
    assert answers[1].json() == {"accepted": 1, "ids": [f"webhook:github:{github_delivery}:0"]}
    assert answers[2].json() == {"accepted": 1, "ids": ["webhook:svix:msg_2abc:0"]}
    run_drain(nats_server.url, database_url, catalog)
    rows = stored(database_url)
    assert set(rows) == {*stripe_ids, f"webhook:github:{github_delivery}:0", "webhook:svix:msg_2abc:0"}
    assert rows["webhook:stripe:evt_1:1"] == (
        "api_call",
        "cus_42",
        {"endpoint": "/v1/b", "method": "POST", "bytes_transferred": 200},
    )
    assert rows[f"webhook:github:{github_delivery}:0"][1] == "octo-org"
    assert rows["webhook:svix:msg_2abc:0"] == ("message_sent", "acc_7", {"channel": "sms", "segments": 2})
    event = get(f"{gateway_url}/v1/events/webhook:svix:msg_2abc:0", headers=AUTH).json()
    assert event["state"] == "stored" and event["timestamp"] == RECENT_TS
    assert event["metadata"] == {"webhook_source": "svix", "webhook_delivery": "msg_2abc"}

    # The senders retry (Stripe signs again with a new timestamp; Svix may sign with a rotated key).
    again = [
        send_stripe(gateway_url, invoice, timestamp=int(time.time()) + 1),
        send_github(gateway_url, push, github_delivery),
        send_svix(
            gateway_url,
            svix_body,
            "msg_2abc",
            signatures=[
                svix_signature(SVIX_OLD_SECRET, "msg_2abc", str(int(time.time())), svix_body),
                "v1,bm90IGl0",
            ],
        ),
    ]
    assert [a.status_code for a in again] == [202, 202, 202], [a.text for a in again]
    run_drain(nats_server.url, database_url, catalog)
    assert stored(database_url).keys() == rows.keys()  # nothing stored twice
    events, kept, duplicates, quarantined = ledger(database_url)
    assert (events, kept, duplicates, quarantined) == (10, 5, 5, 0)
    usage = get(
        f"{gateway_url}/v1/meters/bytes_transferred/usage",
        params={"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "customer_id": "cus_42"},
        headers=AUTH,
    ).json()
    assert sum(float(row["value"]) for row in usage["data"]) == 600


def test_forged_and_stale_signatures_are_401_counted_and_keep_nothing(gateway_url, nats_server):
    body = stripe_invoice("evt_forged", [line("/v1/a", 1)])
    before = {r: rejected("stripe", r) for r in ("bad_signature", "stale_timestamp", "missing_signature")}
    seq = backlog(nats_server.url).last_seq

    forged = send_stripe(gateway_url, body, secret="whsec_somebody_else")
    assert forged.status_code == 401
    assert forged.json()["details"] == [{"reason": "bad_signature"}] and "error" in forged.json()
    tampered = post(
        f"{gateway_url}/v1/webhooks/stripe",
        content=body.replace(b'"quantity": 1', b'"quantity": 9'),
        headers={"Stripe-Signature": stripe_signature(STRIPE_SECRET, body)},
    )
    assert tampered.status_code == 401
    stale = send_stripe(
        gateway_url, body, timestamp=int(time.time()) - 600
    )  # a valid signature, replayed late
    assert stale.status_code == 401 and stale.json()["details"] == [{"reason": "stale_timestamp"}]
    unsigned = post(f"{gateway_url}/v1/webhooks/stripe", content=body)
    assert unsigned.status_code == 401 and unsigned.json()["details"] == [{"reason": "missing_signature"}]
    github = send_github(gateway_url, b'{"repository": {"owner": {"login": "x"}}}', "d-1", secret="wrong")
    assert github.status_code == 401

    assert rejected("stripe", "bad_signature") == before["bad_signature"] + 2
    assert rejected("stripe", "stale_timestamp") == before["stale_timestamp"] + 1
    assert rejected("stripe", "missing_signature") == before["missing_signature"] + 1
    assert rejected("github", "bad_signature") >= 1
    assert backlog(nats_server.url).last_seq == seq  # nothing of them reached JetStream
    # GET /metrics serves the count (the default registry).
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(get(f"{gateway_url}/metrics").text)
        for s in family.samples
    }
    key = ("meter_webhook_rejected_total", (("reason", "bad_signature"), ("source", "stripe")))
    assert scraped[key] == before["bad_signature"] + 2


def test_unknown_source_missing_secret_and_too_large(gateway_url, settings):
    unknown = post(f"{gateway_url}/v1/webhooks/paypal", content=b"{}")
    assert unknown.status_code == 404 and "paypal" in unknown.json()["error"]
    before = rejected("unconfigured", "no_secret")
    body = b'{"customer": "c"}'
    unset = post(
        f"{gateway_url}/v1/webhooks/unconfigured",
        content=body,
        headers={"X-Hub-Signature-256": github_signature("anything", body)},
    )
    assert unset.status_code == 503 and "TEST_NEVER_SET_SECRET" in unset.json()["error"]
    assert unset.headers["Retry-After"] == "60"
    assert rejected("unconfigured", "no_secret") == before + 1
    huge = b'{"pad": "' + b"x" * settings.max_body_bytes + b'"}'
    too_large = post(f"{gateway_url}/v1/webhooks/github", content=huge, headers={"X-GitHub-Delivery": "big"})
    assert too_large.status_code == 413 and too_large.json()["error"]


def quarantine_rows(gateway_url: str) -> list[dict[str, Any]]:
    answer = get(f"{gateway_url}/v1/quarantine", params={"reason": "unmapped"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_a_signed_delivery_that_maps_to_nothing_is_quarantined_with_its_reasons(
    gateway_url, nats_server, database_url, catalog
):
    # GitHub's ping (sent when a hook is created) has no repository.owner: nothing to map.
    ping = json.dumps({"zen": "Design for failure.", "hook_id": 1}).encode()
    answer = send_github(gateway_url, ping, "ping-1")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 0 and body["ids"] == []
    assert body["quarantined"]["id"] == "webhook:github:ping-1:unmapped"
    assert body["quarantined"]["reasons"] == [
        {
            "field": "customer_id",
            "reason": "unmapped",
            "message": "path 'repository.owner.login' is missing in the payload",
        }
    ]
    # Not JSON at all, but signed: kept too. And a fan-out with one bad line: the good ones count.
    assert (
        send_github(gateway_url, b"payload=%7B%7D", "form-1").json()["quarantined"]["reasons"][0]["field"]
        == ""
    )
    partly = send_stripe(
        gateway_url, stripe_invoice("evt_part", [line("/v1/ok", 5), {"quantity": 1}, "junk"])
    )
    assert partly.status_code == 202 and partly.json()["ids"] == [
        "webhook:stripe:evt_part:0",
        "webhook:stripe:evt_part:1",
    ]
    assert [r["field"] for r in partly.json()["quarantined"]["reasons"]] == ["data.object.lines.data[2]"]
    # (line 1 maps, without an endpoint: the catalog's `required` quarantines it in the pipeline)

    pending = get(f"{gateway_url}/v1/events/webhook:github:ping-1:unmapped", headers=AUTH).json()
    assert pending["state"] == "pending"
    run_drain(nats_server.url, database_url, catalog)
    rows = {r["id"]: r for r in quarantine_rows(gateway_url)}
    assert set(rows) == {
        "webhook:github:ping-1:unmapped",
        "webhook:github:form-1:unmapped",
        "webhook:stripe:evt_part:unmapped",
    }
    ping_row = rows["webhook:github:ping-1:unmapped"]
    kept_ping = get(f"{gateway_url}/v1/events/webhook:github:ping-1:unmapped", headers=AUTH).json()
    assert kept_ping["state"] == "quarantined" and kept_ping["reasons"] == body["quarantined"]["reasons"]
    assert ping_row["reasons"] == body["quarantined"]["reasons"]
    assert ping_row["payload"] is None and json.loads(ping_row["payload_text"]) == json.loads(ping)
    assert rows["webhook:stripe:evt_part:unmapped"]["event_type"] == "api_call"
    assert set(stored(database_url)) == {"webhook:stripe:evt_part:0"}
    state = get(f"{gateway_url}/v1/events/webhook:stripe:evt_part:1", headers=AUTH).json()
    assert state["state"] == "quarantined"  # the required endpoint is missing

    # A redelivery of the ping (after JetStream's duplicate window too) is not quarantined twice.
    send_github(gateway_url, ping, "ping-1")
    run_drain(nats_server.url, database_url, catalog)
    assert len(quarantine_rows(gateway_url)) == 3
    events, kept, duplicates, quarantined = ledger(database_url)
    assert events == kept + duplicates + quarantined and quarantined == 4 and kept == 1


def start_nats_again(nats_server) -> None:
    """Start the (stopped) session nats-server again on its port and file store."""
    nats_server.server = start_nats(nats_server.store, port=int(nats_server.url.rsplit(":", 1)[1]))


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_while_nats_is_down_deliveries_get_503_and_their_retries_are_kept_once(
    gateway_url, nats_server, database_url, catalog
):
    push = json.dumps({"repository": {"owner": {"login": "octo-org"}}}).encode()
    ping = json.dumps({"zen": "Anything added dilutes everything else."}).encode()
    nats_server.server.stop()
    try:
        for answer in (send_github(gateway_url, push, "down-1"), send_github(gateway_url, ping, "down-ping")):
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] and answer.json()["error"]
    finally:
        start_nats_again(nats_server)

    def retried() -> bool:  # as GitHub would: the same delivery again, until it is taken
        answer = send_github(gateway_url, push, "down-1")
        assert answer.status_code in (202, 503), answer.text
        return answer.status_code == 202

    wait_until(retried)
    assert send_github(gateway_url, ping, "down-ping").status_code == 202
    assert send_github(gateway_url, push, "down-1").status_code == 202  # one retry too many
    run_drain(nats_server.url, database_url, catalog)
    assert set(stored(database_url)) == {"webhook:github:down-1:0"}
    assert [r["id"] for r in quarantine_rows(gateway_url)] == ["webhook:github:down-ping:unmapped"]
    events, kept, duplicates, quarantined = ledger(database_url)
    assert events == kept + duplicates + quarantined and (kept, quarantined) == (1, 1)
