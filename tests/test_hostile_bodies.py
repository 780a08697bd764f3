"""Hostile bodies against the real gateway served by uvicorn: each gets a clear 4xx in the contract's
error shape that an ordinary client can read, nothing of it reaches JetStream, and a normal request
right after succeeds."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
import requests

from tests.helpers import RECENT_TS, api_call, backlog, query, run_drain

NDJSON = "application/x-ndjson"


def auth_headers(request: pytest.FixtureRequest) -> dict[str, str]:
    """A valid admin key when the suite has one (fixture ``admin_key``), else METER_TEST_ADMIN_KEY."""
    try:
        key = request.getfixturevalue("admin_key")
    except pytest.FixtureLookupError:
        key = os.environ.get("METER_TEST_ADMIN_KEY", "test-admin-key")
    return {"Authorization": f"Bearer {key}"}


def send(
    url: str, body: bytes, headers: dict[str, str], *, path: str = "/v1/events", timeout: float = 60
) -> tuple[int, dict[str, Any]]:
    """POST with urllib (standard library): the status and the decoded JSON answer."""
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_refused(answer: tuple[int, dict[str, Any]], status: int) -> dict[str, Any]:
    code, body = answer
    assert code == status, body
    assert set(body) == {"error", "details"} and isinstance(body["error"], str) and body["error"]
    assert isinstance(body["details"], list)
    return body


def assert_unharmed(url: str, headers: dict[str, str], nats_url: str, seq: int = 0) -> None:
    """Nothing of the refused request was published; a normal request right after is accepted."""
    assert backlog(nats_url).last_seq == seq
    code, body = send(
        url, json.dumps(api_call("after")).encode(), {**headers, "Content-Type": "application/json"}
    )
    assert code == 202 and body["ids"] == ["after"], body


def _event(**extra: Any) -> dict[str, Any]:
    return {"event_type": "api_call", "customer_id": "c1", "id": "hostile", **extra}


HOSTILE: dict[str, tuple[bytes, str, int]] = {
    "100,000 nested [": (b"[" * 100_000, "application/json", 400),
    "100,000 nested {": (b'{"a":' * 100_000, "application/json", 400),
    "deep nesting in properties, with a bad field": (
        json.dumps(_event(customer_id="")).encode()[:-1] + b', "x": ' + b"[" * 600 + b"]" * 600 + b"}",
        "application/json",
        400,
    ),
    "100,000 nested [ as NDJSON": (b"[" * 100_000, NDJSON, 400),
    "invalid UTF-8 in a string": (
        b'{"event_type": "api_call", "customer_id": "c\xff\xfe"}',
        "application/json",
        400,
    ),
    "a NUL byte in a string": (
        b'{"event_type": "api_call", "customer_id": "c\x00"}',
        "application/json",
        400,
    ),
    "an escaped NUL": (json.dumps(_event(properties={"k": "a\u0000b"})).encode(), "application/json", 400),
    "1e400": (json.dumps(_event()).encode()[:-1] + b', "properties": {"n": 1e400}}', "application/json", 400),
    "-1e400": (
        json.dumps(_event()).encode()[:-1] + b', "properties": {"n": -1e400}}',
        "application/json",
        400,
    ),
    "duplicate keys, one bad": (
        b'{"event_type": "api_call", "customer_id": "c1", "customer_id": ""}',
        "application/json",
        400,
    ),
    "NDJSON sent as application/json": (
        (json.dumps(api_call("a")) + "\n" + json.dumps(api_call("b"))).encode(),
        "application/json",
        400,
    ),
    "a JSON array sent as NDJSON": (json.dumps([api_call("a"), api_call("b")]).encode(), NDJSON, 400),
    "JSON sent as text/plain": (json.dumps(api_call("a")).encode(), "text/plain", 415),
    "JSON sent as application/octet-stream": (
        json.dumps(api_call("a")).encode(),
        "application/octet-stream",
        415,
    ),
}


@pytest.mark.parametrize(("body", "content_type", "status"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_body_is_a_clear_4xx_and_harms_nothing(
    request, gateway_url, nats_server, body, content_type, status
):
    headers = auth_headers(request)
    assert_refused(send(gateway_url, body, {**headers, "Content-Type": content_type}), status)
    assert_unharmed(gateway_url, headers, nats_server.url)


def test_ten_thousand_properties_and_a_one_megabyte_string_are_accepted(request, gateway_url, nats_server):
    """Within the 5 MiB limit these are ordinary events (the limit is the body's size)."""
    headers = {**auth_headers(request), "Content-Type": "application/json"}
    many = _event(id="many", properties={f"p{i}": i for i in range(10_000)})
    long = _event(id="long", properties={"s": "x" * 1_000_000})
    code, body = send(gateway_url, json.dumps([many, long]).encode(), headers)
    assert code == 202 and body["ids"] == ["many", "long"], body
    # with a bad item alongside, the whole batch is refused and nothing is kept
    code, body = send(gateway_url, json.dumps([many, long, _event(customer_id="")]).encode(), headers)
    assert code == 400 and body["details"][0]["index"] == 2
    assert_unharmed(gateway_url, auth_headers(request), nats_server.url, seq=1)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_bodies_are_415(request, gateway_url, nats_server, encoding):
    """Content-Encoding is not accepted (so a gzip bomb is never inflated): 415, whatever it holds."""
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]", compresslevel=9)  # ~50 MB inflated, ~50 KB sent
    headers = {**auth_headers(request), "Content-Type": "application/json", "Content-Encoding": encoding}
    assert_refused(send(gateway_url, bomb, headers), 415)
    assert_unharmed(gateway_url, auth_headers(request), nats_server.url)


def test_a_60_mb_body_gets_a_413_that_urllib_and_requests_read(request, gateway_url, nats_server):
    body = b"[" + b" " * (60 * 1024 * 1024) + b"]"
    headers = {**auth_headers(request), "Content-Type": "application/json"}
    assert_refused(send(gateway_url, body, headers), 413)
    # chunked (no Content-Length): the limit holds while streaming, and the answer is readable too
    chunks = (body[i : i + 1024 * 1024] for i in range(0, len(body), 1024 * 1024))
    req = urllib.request.Request(gateway_url + "/v1/events", data=chunks, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    assert refused.value.code == 413 and json.loads(refused.value.read())["error"]
    # requests too
    answer = requests.post(gateway_url + "/v1/events", data=body, headers=headers, timeout=60)
    assert answer.status_code == 413 and answer.json()["error"]
    # a 60 MB upload with the wrong content type: 415, just as readable
    assert_refused(send(gateway_url, body, {**headers, "Content-Type": "text/plain"}), 415)
    assert_unharmed(gateway_url, auth_headers(request), nats_server.url)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("expect", ["", "100-continue"], ids=["no Expect", "Expect: 100-continue"])
def test_a_60_mb_body_gets_a_413_that_curl_reads(request, gateway_url, nats_server, tmp_path, expect):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.write(b"[" + b" " * (60 * 1024 * 1024) + b"]")
    auth = auth_headers(request)["Authorization"]
    result = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60",
         "-H", "Content-Type: application/json", "-H", f"Authorization: {auth}", "-H", f"Expect: {expect}",
         "--data-binary", f"@{big}", gateway_url + "/v1/events"],
        capture_output=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer, _, code = result.stdout.decode().rpartition("\n")
    assert code == "413" and json.loads(answer)["error"]
    assert_unharmed(gateway_url, auth_headers(request), nats_server.url)


def test_the_deepest_event_the_gateway_accepts_reaches_the_database(
    request, gateway_url, nats_server, database_url, catalog
):
    """msgspec's nesting limit depends on the caller's stack depth: an event nested as deep as the
    gateway accepts must not become a message the pipeline cannot decode (it is stored or quarantined)."""
    headers = {**auth_headers(request), "Content-Type": "application/json"}
    accepted = None
    for depth in range(1000, 900, -5):
        event = json.dumps(_event(id=f"deep-{depth}", timestamp=RECENT_TS)).encode()[:-1]
        code, _ = send(
            gateway_url, event + b', "properties": {"n": ' + b"[" * depth + b"]" * depth + b"}}", headers
        )
        assert code in (202, 400)
        if code == 202:
            accepted = f"deep-{depth}"
            break
    assert accepted is not None
    run_drain(nats_server.url, database_url, catalog)
    stored = query(database_url, "SELECT count(*) FROM usage_events WHERE id = %s", (accepted,))[0][0]
    quarantined = query(
        database_url, "SELECT count(*) FROM quarantined_events WHERE event_id = %s", (accepted,)
    )
    assert stored + quarantined[0][0] == 1


ADMIN_BODIES = {
    "nested arrays": b"[" * 30_000,  # under the 64 KiB limit of admin bodies, far too deep
    "nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "invalid UTF-8 in a string": b'{"name": "\xff\xfe"}',
    "not an object": b"[1, 2]",
    "not JSON": b"{name: x}",
}


@pytest.mark.parametrize("body", list(ADMIN_BODIES.values()), ids=list(ADMIN_BODIES))
@pytest.mark.parametrize(("method", "path"), [("PUT", "/v1/customers/hostile"), ("POST", "/v1/keys")])
def test_hostile_bodies_on_the_admin_routes_are_400(request, gateway_url, method, path, body):
    headers = {**auth_headers(request), "Content-Type": "application/json"}
    req = urllib.request.Request(gateway_url + path, data=body, headers=headers, method=method)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    answer = json.loads(refused.value.read())
    assert refused.value.code == 400, answer
    assert set(answer) == {"error", "details"} and answer["error"]
    check = urllib.request.Request(gateway_url + "/v1/customers/hostile", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(check, timeout=30)
    assert missing.value.code == 404  # nothing of the refused request was kept
