"""API keys on the real gateway (and PostgreSQL, NATS): 401/403/429, customer-bound keys, revocation
after the cache time, hashes only in the database, ``meter keys``, the first key file, the audit log."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from ingest_gateway.app import create_app
from meter_platform.access import ensure_key_file, find_key, hash_key
from meter_platform.access import keys as access_keys
from meter_platform.billing import invoicing
from meter_platform.cli import main
from meter_platform.storage import db
from tests.billing.support import AFTER_GRACE, MARCH, billing_catalog, march, old_events_allowed
from tests.helpers import ADMIN_KEY_ID, AUTH, api_call, backlog, query, scalar

__all__ = ["billing_catalog", "march", "old_events_allowed"]  # fixtures used here

#: A short key cache, so that a revocation shows within the test.
CACHE_SECONDS = 0.3


def make_key(database_url: str, scopes: list[str], **kwargs: Any) -> tuple[str, str]:
    """A new key stored in the database: its id and its secret."""
    with db.connect(database_url) as conn:
        key, secret = access_keys.create_key(conn, scopes, **kwargs)
        conn.commit()
    return key.id, secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def client(clean, settings, catalog) -> Iterator[TestClient]:
    app = create_app(dataclasses.replace(settings, auth_cache_seconds=CACHE_SECONDS), catalog)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_every_v1_route_needs_a_key_and_revocation_takes_effect_after_the_cache(client, database_url):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    missing = client.get("/v1/meters")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert set(missing.json()) == {"error", "details"}
    assert client.post("/v1/events", json=api_call("e1")).status_code == 401
    unknown = client.get("/v1/meters", headers=bearer("mk_live_not-a-key"))
    assert unknown.status_code == 401 and "not-a-key" not in unknown.text
    assert client.get("/v1/meters", headers={"Authorization": "Basic abc"}).status_code == 401

    key_id, secret = make_key(database_url, ["read"])
    assert client.get("/v1/meters", headers=bearer(secret)).status_code == 200
    with db.connect(database_url) as conn:
        access_keys.revoke_key(conn, key_id)
        conn.commit()
    time.sleep(CACHE_SECONDS + 0.2)
    revoked = client.get("/v1/meters", headers=bearer(secret))
    assert revoked.status_code == 401 and secret not in revoked.text
    # last use was stamped
    assert scalar(database_url, "SELECT last_used_at IS NOT NULL FROM api_keys WHERE id = %s", (key_id,))


def test_scopes_decide_the_routes(client, database_url, nats_server):
    _, read = make_key(database_url, ["read"])
    _, ingest = make_key(database_url, ["ingest"])
    refused = client.post("/v1/events", json=api_call("r1"), headers=bearer(read))
    assert refused.status_code == 403 and read not in refused.text
    assert backlog(nats_server.url).last_seq == 0
    usage = client.get(
        "/v1/meters/api_calls/usage", params={"from": "2026-01-01T00:00:00Z"}, headers=bearer(ingest)
    )
    assert usage.status_code == 403
    assert client.post("/v1/events", json=api_call("i1"), headers=bearer(ingest)).status_code == 202
    assert client.get("/v1/ingest/status", headers=bearer(read)).status_code == 200
    assert client.get("/v1/quarantine", headers=bearer(read)).status_code == 200
    assert client.get("/v1/customers", headers=bearer(read)).status_code == 403
    assert client.put("/v1/customers/x", json={}, headers=bearer(ingest)).status_code == 403
    assert client.get("/v1/audit", headers=bearer(read)).status_code == 403
    assert client.get("/v1/customers", headers=AUTH).status_code == 200


def test_a_customer_key_sees_and_sends_only_its_customer(client, database_url, nats_server, march):
    invoicing.bill_period(database_url, march, MARCH, now=AFTER_GRACE)
    _, a_read = make_key(database_url, ["read"], customer_id="a")
    _, a_ingest = make_key(database_url, ["ingest"], customer_id="a")
    listed = client.get("/v1/invoices", params={"period": MARCH}, headers=bearer(a_read)).json()["invoices"]
    assert {i["customer_id"] for i in listed} == {"a"}
    everyone = client.get("/v1/invoices", params={"period": MARCH}, headers=AUTH).json()["invoices"]
    b_invoice = next(i["id"] for i in everyone if i["customer_id"] == "b")
    a_invoice = next(i["id"] for i in everyone if i["customer_id"] == "a")
    assert client.get(f"/v1/invoices/{a_invoice}", headers=bearer(a_read)).status_code == 200
    assert client.get(f"/v1/invoices/{b_invoice}", headers=bearer(a_read)).status_code == 404
    assert client.get(f"/v1/invoices/{b_invoice}.html", headers=bearer(a_read)).status_code == 404
    assert client.get("/v1/invoices", params={"customer_id": "b"}, headers=bearer(a_read)).status_code == 403
    csv_text = client.get("/v1/invoices.csv", params={"period": MARCH}, headers=bearer(a_read)).text
    assert ",b," not in csv_text

    params = {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z", "group_by": "customer_id"}
    usage = client.get("/v1/meters/api_calls/usage", params=params, headers=bearer(a_read))
    assert usage.status_code == 200, usage.text
    everyone_usage = client.get("/v1/meters/api_calls/usage", params=params, headers=AUTH).json()["data"]
    assert {row["customer_id"] for row in everyone_usage} == {"a", "b"}
    assert {row["customer_id"] for row in usage.json()["data"]} == {"a"}
    other = client.get(
        "/v1/meters/api_calls/usage", params={**params, "customer_id": "b"}, headers=bearer(a_read)
    )
    assert other.status_code == 403
    assert client.get("/v1/customers", headers=bearer(a_read)).status_code == 403

    before = backlog(nats_server.url).last_seq
    mixed = [api_call("m1", customer="a"), api_call("m2", customer="b")]
    refused = client.post("/v1/events", json=mixed, headers=bearer(a_ingest))
    assert refused.status_code == 403, refused.text
    assert refused.json()["details"] == [{"index": 1, "field": "customer_id", "message": "another customer"}]
    assert backlog(nats_server.url).last_seq == before  # nothing of the batch was kept
    assert (
        client.post("/v1/events", json=[api_call("m1", customer="a")], headers=bearer(a_ingest)).status_code
        == 202
    )


def test_over_the_rate_is_429_with_retry_after_and_nothing_kept(client, database_url, nats_server):
    _, slow = make_key(database_url, ["ingest"], events_per_second=10)
    assert (
        client.post(
            "/v1/events", json=[api_call(f"s{i}") for i in range(8)], headers=bearer(slow)
        ).status_code
        == 202
    )
    seq = backlog(nats_server.url).last_seq
    over = client.post("/v1/events", json=[api_call(f"t{i}") for i in range(8)], headers=bearer(slow))
    assert over.status_code == 429, over.text
    assert int(over.headers["Retry-After"]) >= 1
    assert backlog(nats_server.url).last_seq == seq  # the refused batch was not published at all

    _, chatty = make_key(database_url, ["read"], requests_per_second=2)
    answers = [client.get("/v1/meters", headers=bearer(chatty)).status_code for _ in range(4)]
    assert answers[:2] == [200, 200] and 429 in answers[2:]


def test_only_hashes_are_stored(database_url):
    key_id, secret = make_key(database_url, ["admin"], name="ops")
    assert secret.startswith("mk_live_") and len(secret) > 40
    row = query(database_url, "SELECT * FROM api_keys WHERE id = %s", (key_id,))[0]
    assert secret not in json.dumps([str(v) for v in row])
    assert hash_key(secret) in row
    with db.connect(database_url) as conn:
        found = find_key(conn, secret)
        assert found is not None and found.id == key_id
        assert find_key(conn, secret + "x") is None


def test_meter_keys_create_list_revoke(clean, database_url, monkeypatch, capsys):
    monkeypatch.setenv("METER_DATABASE_URL", database_url)
    assert main(["keys", "create", "--scope", "read", "--name", "portal", "--customer", "c9", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert set(created) == {"id", "key", "scopes", "name", "customer_id", "created_at"}
    assert (created["scopes"], created["name"], created["customer_id"]) == (["read"], "portal", "c9")
    assert main(["keys", "create", "--scope", "ingest"]) == 0
    out = capsys.readouterr()
    assert "mk_live_" in out.out and "only time" in out.err
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    header = listing.splitlines()[0].split()
    assert header[:5] == ["id", "prefix", "name", "scopes", "customer"]
    assert created["id"] in listing and "portal" in listing and created["key"] not in listing
    assert main(["keys", "revoke", created["id"]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert scalar(database_url, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = %s", (created["id"],))
    assert main(["keys", "revoke", "key_nope"]) == 2


def test_the_first_start_writes_an_admin_key_file_0600(clean, database_url, tmp_path):
    data_dir = tmp_path / ".meter"
    secret = ensure_key_file(database_url, data_dir)
    assert secret is not None
    path = data_dir / "api-key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() == secret
    with db.connect(database_url) as conn:
        key = find_key(conn, secret)
        assert key is not None and key.scopes == ("admin",)
    assert ensure_key_file(database_url, data_dir) is None  # a second start keeps it
    with db.connect(database_url) as conn:
        access_keys.revoke_key(conn, key.id)
        conn.commit()
    assert ensure_key_file(database_url, data_dir) not in (None, secret)  # a dead key is replaced


def test_the_cli_reads_the_key_file(tmp_path, monkeypatch):
    from meter_platform.cli.common import auth_headers

    monkeypatch.delenv("METER_API_KEY", raising=False)
    monkeypatch.setenv("METER_HOME", str(tmp_path))
    assert auth_headers() == {}
    (tmp_path / ".meter").mkdir()
    (tmp_path / ".meter" / "api-key").write_text("mk_live_fromfile\n")
    assert auth_headers() == {"Authorization": "Bearer mk_live_fromfile"}
    monkeypatch.setenv("METER_API_KEY", "mk_live_fromenv")
    assert auth_headers() == {"Authorization": "Bearer mk_live_fromenv"}


def test_admin_actions_are_audited(client, database_url, monkeypatch, capsys):
    monkeypatch.setenv("METER_DATABASE_URL", database_url)
    assert main(["keys", "create", "--scope", "read", "--json"]) == 0
    key_id = json.loads(capsys.readouterr().out)["id"]
    assert main(["keys", "revoke", key_id]) == 0
    assert client.put("/v1/customers/acme", json={"name": "Acme"}, headers=AUTH).status_code == 201
    assert client.put("/v1/customers/acme", json={"bad": 1}, headers=AUTH).status_code == 400  # not audited
    made = client.post("/v1/keys", json={"scopes": ["ingest"], "name": "via api"}, headers=AUTH)
    assert made.status_code == 201 and made.json()["key"].startswith("mk_live_")
    rows = client.get("/v1/audit", headers=AUTH).json()["data"]
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [
        (ADMIN_KEY_ID, "key.create", made.json()["id"]),
        (ADMIN_KEY_ID, "customer.put", "acme"),
        ("cli", "key.revoke", key_id),
        ("cli", "key.create", key_id),
    ]
    assert client.get("/v1/audit", params={"limit": 1, "offset": 1}, headers=AUTH).json()["data"][0][
        "action"
    ] == ("customer.put")


def test_auth_disabled_lets_everything_through(clean, settings, catalog):
    open_settings = dataclasses.replace(settings, auth_enabled=False)
    with TestClient(create_app(open_settings, catalog), raise_server_exceptions=False) as c:
        assert c.get("/v1/meters").status_code == 200
        assert c.post("/v1/events", json=api_call("open-1")).status_code == 202
