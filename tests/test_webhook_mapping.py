"""Webhooks without servers: webhooks.yaml checked with every mistake listed, signatures of the three
sender styles (with the senders' published test vectors and Stripe's own SDK), and payloads mapped
to events or to reasons."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import stripe

from ingest_gateway.webhook_signatures import SignatureError, secrets_of, verify
from meter_platform.capture.envelope import now_us
from meter_platform.catalog import CatalogError, load_catalog
from meter_platform.catalog.webhook_mapping import delivery_id, event_id, map_delivery
from meter_platform.catalog.webhooks import WebhookSource
from meter_platform.config import EXAMPLE_CATALOG_DIR

SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # Svix's documented example secret


def github_signature(secret: str, body: bytes) -> str:
    """X-Hub-Signature-256 as GitHub computes it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def svix_signature(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """svix-signature as Svix computes it (whsec_<base64> key, over id.timestamp.body)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def stripe_signature(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """Stripe-Signature made by Stripe's official SDK."""
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp)


def headers_of(values: dict[str, str]):
    """The two header readers the gateway passes (one value, every value), case-insensitive."""
    lower = {k.lower(): v for k, v in values.items()}
    return (lambda name: lower.get(name.lower())), (
        lambda name: [lower[name.lower()]] if name.lower() in lower else []
    )


def catalog_with(tmp_path: Path, webhooks_yaml: str):
    """The example catalog with this webhooks.yaml."""
    directory = tmp_path / "catalog"
    shutil.copytree(EXAMPLE_CATALOG_DIR, directory)
    (directory / "webhooks.yaml").write_text(webhooks_yaml)
    return load_catalog(directory)


def example(name: str) -> WebhookSource:
    return load_catalog(EXAMPLE_CATALOG_DIR).webhooks[name]


# -- signatures ------------------------------------------------------------------------------------


def test_the_senders_published_test_vectors_match_the_helpers():
    # GitHub's documentation and Svix's documentation give these exact values.
    assert github_signature("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )
    body = b'{"test": 2432232314}'
    assert svix_signature(SVIX_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_svix_documented_delivery_verifies_within_tolerance_and_is_stale_later():
    source = example("messaging")
    keys, why = secrets_of(source, {"MESSAGING_WEBHOOK_SECRET": SVIX_SECRET})
    assert keys and not why
    body = b'{"test": 2432232314}'
    _, many = headers_of(
        {
            "svix-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "svix-timestamp": "1614265330",
            # rotation: an unknown signature first, the good one second
            "svix-signature": "v1,AAAA" + " v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        }
    )
    verify(source, keys, body, many, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330 + 10)
    with pytest.raises(SignatureError) as stale:
        verify(source, keys, body, many, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330 + 301)
    assert stale.value.reason == "stale_timestamp"
    with pytest.raises(SignatureError) as bad:
        verify(source, keys, body + b" ", many, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330)
    assert bad.value.reason == "bad_signature"


def test_stripe_sdk_header_verifies_and_a_tampered_one_does_not():
    source = example("stripe")
    secret = "whsec_test_secret_for_stripe"
    keys, _ = secrets_of(source, {"STRIPE_WEBHOOK_SECRET": secret})  # the old one is unset: skipped
    body = b'{"id": "evt_1", "created": 1}'
    header = stripe_signature(secret, body)
    _, many = headers_of({"Stripe-Signature": header})
    verify(source, keys, body, many, "evt_1", time.time())
    # Stripe's own SDK agrees that this header is valid (so the test's deliveries are real).
    assert stripe.WebhookSignature.verify_header(body.decode(), header, secret, tolerance=300)
    _, forged = headers_of({"Stripe-Signature": header[:-4] + "0000"})
    with pytest.raises(SignatureError, match="No signature"):
        verify(source, keys, body, forged, "evt_1", time.time())
    _, none = headers_of({})
    with pytest.raises(SignatureError) as missing:
        verify(source, keys, body, none, "evt_1", time.time())
    assert missing.value.reason == "missing_signature"


def test_secret_rotation_on_our_side_either_secret_passes():
    source = example("stripe")
    keys, _ = secrets_of(
        source, {"STRIPE_WEBHOOK_SECRET": "whsec_new", "STRIPE_WEBHOOK_SECRET_OLD": "whsec_old"}
    )
    body = b"{}"
    for secret in ("whsec_new", "whsec_old"):
        _, many = headers_of({"Stripe-Signature": stripe_signature(secret, body)})
        verify(source, keys, body, many, "x", time.time())
    assert secrets_of(source, {}) == (
        [],
        "environment variable STRIPE_WEBHOOK_SECRET is not set; "
        "environment variable STRIPE_WEBHOOK_SECRET_OLD is not set",
    )


def test_github_signature_and_garbage_headers():
    source = example("github")
    keys, _ = secrets_of(source, {"GITHUB_WEBHOOK_SECRET": "s3cret"})
    body = b'{"zen": "Keep it logically awesome."}'
    _, good = headers_of({"X-Hub-Signature-256": github_signature("s3cret", body)})
    verify(source, keys, body, good, "d1", time.time())
    for value in ("sha256=zz", "sha256=", "sha1=abc", "sha256=" + "0" * 64, "x" * 10_000):
        _, bad = headers_of({"X-Hub-Signature-256": value})
        with pytest.raises(SignatureError):
            verify(source, keys, body, bad, "d1", time.time())


# -- mapping ---------------------------------------------------------------------------------------


def _stripe_invoice(lines: list[Any], customer: Any = "cus_1") -> bytes:
    return json.dumps(
        {
            "id": "evt_9",
            "created": int(time.time()) - 60,
            "data": {"object": {"customer": customer, "lines": {"data": lines}}},
        }
    ).encode()


def test_fan_out_reads_items_and_the_deliverys_top_level():
    source = example("stripe")
    body = _stripe_invoice(
        [
            {"quantity": 3.5, "metadata": {"bucket": "b1", "storage_class": "archive"}},
            {"quantity": 1, "metadata": {"bucket": "b2"}},
        ]
    )
    one, _ = headers_of({})
    assert delivery_id(source, body, one) == "evt_9"
    mapped = map_delivery(source, body, "evt_9", now_us(), one)
    assert mapped.problems == [] and mapped.items == 2
    assert [e.id for e in mapped.events] == ["webhook:stripe:evt_9:0", "webhook:stripe:evt_9:1"]
    first = mapped.events[0]
    assert (first.event_type, first.customer_id) == ("storage_usage", "cus_1")
    assert first.properties == {"bucket": "b1", "gb_hours": 3.5, "storage_class": "archive"}
    assert first.metadata == {"webhook_source": "stripe", "webhook_delivery": "evt_9"}
    assert first.timestamp is not None and first.timestamp.endswith("Z")


def test_what_does_not_map_comes_back_as_reasons_per_item():
    source = example("stripe")
    one, _ = headers_of({})
    body = _stripe_invoice([{"quantity": 1, "metadata": {"bucket": "b"}}, "not an object"])
    mapped = map_delivery(source, body, "evt_9", now_us(), one)
    assert len(mapped.events) == 1
    assert [(p.field, p.reason) for p in mapped.problems] == [("data.object.lines.data[1]", "unmapped")]
    for broken, field in (
        (b"not json", ""),
        (json.dumps({"id": "e", "data": {}}).encode(), "data.object.lines.data"),
        (_stripe_invoice([]), "data.object.lines.data"),
        (_stripe_invoice([{"quantity": 1}], customer=None), "data.object.lines.data[0].customer_id"),
        (_stripe_invoice([{"quantity": 1}], customer="x" * 300), "data.object.lines.data[0].customer_id"),
    ):
        mapped = map_delivery(source, broken, "e", now_us(), one)
        assert mapped.events == [] and [p.field for p in mapped.problems] == [field], broken


def test_timestamps_unix_seconds_rfc3339_and_bad_ones():
    source = example("messaging")
    one, _ = headers_of({})

    def mapped_ts(value: Any):
        body = json.dumps({"data": {"account_id": 42, "channel": "sms", "sent_at": value}}).encode()
        return map_delivery(source, body, "m", now_us(), one)

    ok = mapped_ts(1_700_000_000)
    assert ok.events[0].timestamp == "2023-11-14T22:13:20.000000Z"
    assert ok.events[0].customer_id == "42"  # a numeric id becomes text
    assert mapped_ts("2023-11-14T23:13:20.5+01:00").events[0].timestamp == "2023-11-14T22:13:20.500000Z"
    for bad in ("yesterday", 10**15, True, {"a": 1}, time.time() + 3600):
        result = mapped_ts(bad)
        assert result.events == [] and result.problems[0].field == "timestamp", bad


def test_a_long_delivery_id_is_hashed_to_at_most_128_characters():
    long_id = "d" * 500
    scoped = event_id("src", long_id, 3)
    assert len(scoped) <= 128 and scoped == event_id("src", long_id, 3) != event_id("src", long_id, 4)
    # A payload's id may hold line breaks or spaces; ids (also sent as a NATS header) never do.
    odd = event_id("src", "evt 1\r\nNats-Msg-Id: x", 0)
    assert odd.startswith("webhook:src:sha256:") and odd.isascii() and " " not in odd and "\n" not in odd


# -- webhooks.yaml ---------------------------------------------------------------------------------

BAD_YAML = """
extra: 1
sources:
  Bad Name:
    secret_env: X
    signature: github
    events: {event_type: {const: api_call}, customer_id: a, properties: {endpoint: {const: /x}}}
  no-secret:
    secret: plain-text
    signature: {preset: paypal}
    events: {event_type: {const: api_call}, customer_id: a, properties: {endpoint: {const: /x}}}
  custom:
    secret_env: CUSTOM
    signature: {header: X-Sig, encoding: base32, signed: "{timestamp}.{payload}", timestamp: {query: t}}
    events: {event_type: {const: teleport}, customer_id: "a..b", colour: red}
  missing-required:
    secret_env: OK
    signature: github
    events: {event_type: {const: api_call}, customer_id: a}
"""


def test_a_bad_webhooks_yaml_lists_every_mistake(tmp_path):
    with pytest.raises(CatalogError) as err:
        catalog_with(tmp_path, BAD_YAML)
    text = str(err.value)
    for expected in (
        "unknown top-level key(s) ['extra']",
        "source 'Bad Name': the name must be lower-case",
        "source 'no-secret': a secret must not be written in the file",
        "source 'no-secret': secret_env must name the environment variable",
        "source 'no-secret': signature: preset 'paypal' is not one of stripe, github, svix",
        "source 'custom': signature: encoding 'base32' is not one of hex, base64",
        "source 'custom': signature: timestamp must be {header: <name>} or {element: <prefix>}",
        "source 'custom': signature: signed uses ['{payload}']",
        "source 'custom': signature: signed must hold {body} exactly once",
        "source 'custom': events: unknown key(s) ['colour']",
        "source 'custom': events.customer_id must be a dotted path",
        "source 'custom': events.event_type 'teleport' is not declared in events.yaml",
        "source 'missing-required': events.properties: event type 'api_call' requires ['endpoint']",
    ):
        assert expected in text, expected
    assert "has 15 problem(s)" in text, text


def test_the_example_catalog_declares_the_three_styles():
    webhooks = load_catalog(EXAMPLE_CATALOG_DIR).webhooks
    assert {w.signature.header for w in webhooks.values()} == {
        "svix-signature",
        "Stripe-Signature",
        "X-Hub-Signature-256",
    }


STANDARD_WEBHOOKS_YAML = """
sources:
  standard:
    secret_env: STANDARD_SECRET
    signature: {preset: svix, header: webhook-signature, timestamp: {header: webhook-timestamp}, tolerance_seconds: 60}
    delivery_id: {header: webhook-id}
    events:
      event_type: type
      customer_id: {const: acme}
      properties: $.data
"""


def test_a_preset_changed_part_by_part_covers_standard_webhooks(tmp_path):
    """Standard Webhooks is Svix's scheme under other header names: the svix preset, three parts changed."""
    source = catalog_with(tmp_path, STANDARD_WEBHOOKS_YAML).webhooks["standard"]
    keys, _ = secrets_of(source, {"STANDARD_SECRET": SVIX_SECRET})
    body = json.dumps({"type": "api_call", "data": {"endpoint": "/x"}}).encode()
    now = int(time.time())
    one, many = headers_of(
        {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(now),
            "webhook-signature": svix_signature(SVIX_SECRET, "msg_1", now, body),
        }
    )
    delivery = delivery_id(source, body, one)
    assert delivery == "msg_1"
    verify(source, keys, body, many, delivery, now + 59)
    with pytest.raises(SignatureError, match="60 s"):
        verify(source, keys, body, many, delivery, now + 61)
    mapped = map_delivery(source, body, delivery, now_us(), one)
    assert [(e.id, e.event_type, e.customer_id, e.properties) for e in mapped.events] == [
        ("webhook:standard:msg_1:0", "api_call", "acme", {"endpoint": "/x"})
    ]
    # The id is part of what is signed: another id with the same signature does not pass.
    with pytest.raises(SignatureError):
        verify(source, keys, body, many, "msg_2", now)


def test_reasons_are_capped_at_100_and_say_how_many_more():
    from ingest_gateway.webhooks import MAX_REASONS, capped

    one, _ = headers_of({})
    mapped = map_delivery(example("stripe"), _stripe_invoice(["junk"] * 150), "e", now_us(), one)
    reasons = capped(mapped.problems)
    assert len(mapped.problems) == 150 and len(reasons) == MAX_REASONS + 1 == 101
    assert reasons[-1]["message"] == "and 50 more reason(s)"
