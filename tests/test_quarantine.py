"""Quarantine you can work with, against real JetStream, PostgreSQL and a real gateway: listing with
filters and pages, replay after a catalog fix (counted once, idempotent, concurrent replays), the
ledger, and the ``meter quarantine`` commands."""

from __future__ import annotations

import json
import re
import shutil
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from meter_platform.catalog import Catalog, load_catalog
from meter_platform.cli import main
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.ingestion.quarantine import QuarantineFilter
from meter_platform.ingestion.quarantine_replay import ReplaySummary, replay_quarantine
from meter_platform.storage import db
from tests.helpers import AUTH, RECENT, api_call, publish, query, run_drain, scalar

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture(autouse=True)
def replay_ledger(clean, database_url):
    """Empty tables (``clean``) and an empty replay ledger, before and after each test."""

    def truncate() -> None:
        with db.connect(database_url, autocommit=True) as conn:
            conn.execute("TRUNCATE quarantine_replays RESTART IDENTITY CASCADE")

    truncate()
    yield
    truncate()


@pytest.fixture
def fixed_catalog(tmp_path: Path) -> Catalog:
    """The example catalog, fixed: FETCH is a method, and ``teleport`` is a declared event type."""
    directory = tmp_path / "catalog"
    shutil.copytree(EXAMPLE_CATALOG_DIR, directory)
    events = (directory / "events.yaml").read_text()
    old = "method: {type: string, enum: [GET, POST, PUT, PATCH, DELETE]}"
    assert old in events
    events = events.replace(old, "method: {type: string, enum: [GET, POST, PUT, PATCH, DELETE, FETCH]}")
    events += "  teleport:\n    properties:\n      distance_km: {type: number, min: 0}\n"
    (directory / "events.yaml").write_text(events)
    return load_catalog(directory)


def api_calls_count(database_url: str) -> int:
    """The api_calls meter over all time, from the aggregates."""
    return int(
        scalar(
            database_url,
            "SELECT coalesce(sum(event_count), 0) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'",
        )
    )


def bytes_sum(database_url: str) -> int:
    return int(
        scalar(
            database_url,
            "SELECT coalesce(sum(value_sum), 0) FROM usage_minute_aggregates"
            " WHERE meter_slug = 'bytes_transferred'",
        )
    )


def get(gateway_url: str, path: str, params: Any = None) -> httpx.Response:
    return httpx.get(f"{gateway_url}{path}", params=params, timeout=30, headers=AUTH)


def listing(gateway_url: str, params: Any = None) -> dict[str, Any]:
    response = get(gateway_url, "/v1/quarantine", params)
    assert response.status_code == 200, response.text
    return response.json()


def status(gateway_url: str) -> dict[str, Any]:
    response = get(gateway_url, "/v1/ingest/status")
    assert response.status_code == 200, response.text
    return response.json()


def states(database_url: str) -> dict[str, str]:
    return dict(query(database_url, "SELECT coalesce(event_id, '(raw)'), status FROM quarantined_events"))


def replay_ledger_rows(database_url: str) -> list[tuple]:
    return query(
        database_url,
        "SELECT replay_id, examined, stored, duplicates, still_quarantined, finished_at IS NOT NULL"
        " FROM quarantine_replays ORDER BY replay_id",
    )


def publish_broken(nats_url: str) -> None:
    """Two good events, and six that the example catalog quarantines (four of them fixable)."""
    publish(
        nats_url,
        [
            api_call("ok-1", bytes_transferred=10),
            api_call("ok-2", customer="c2", bytes_transferred=20),
            api_call("fetch-1", method="FETCH", bytes_transferred=100),
            api_call("fetch-2", customer="c2", method="FETCH", bytes_transferred=200),
            api_call("bad-bytes", bytes_transferred="lots"),  # still wrong after the fix
            {"id": "tele-1", "event_type": "teleport", "customer_id": "c3", "timestamp": RECENT.isoformat()},
        ],
    )
    # Published without an id: the pipeline names it after the message header.
    publish(nats_url, api_call(None, method="FETCH", bytes_transferred=300), msg_id="hdr-1")
    publish(nats_url, b"this is not json")


# --- GET /v1/quarantine -----------------------------------------------------------------------------


def test_list_shows_reasons_filters_and_pages(gateway_url, nats_server, database_url, catalog):
    publish_broken(nats_server.url)
    run_drain(nats_server.url, database_url, catalog)
    # A second batch, quarantined later: listed first.
    publish(nats_server.url, api_call("late-comer", customer="c9", method="YEET"))
    run_drain(nats_server.url, database_url, catalog)

    data = listing(gateway_url)["data"]
    assert data[0]["id"] == "late-comer"
    assert {d["id"] for d in data} == {
        "late-comer",
        "fetch-1",
        "fetch-2",
        "bad-bytes",
        "tele-1",
        "hdr-1",
        None,
    }
    assert "next_offset" not in listing(gateway_url)
    by_id = {d["id"]: d for d in data}
    fetch = by_id["fetch-1"]
    assert set(fetch) >= {
        "quarantine_id",
        "id",
        "event_type",
        "customer_id",
        "timestamp",
        "received_at",
        "quarantined_at",
        "reasons",
        "payload",
        "status",
        "stream_seq",
    }
    assert fetch["reasons"] == [
        {
            "field": "properties.method",
            "reason": "enum",
            "message": "must be one of GET, POST, PUT, PATCH, DELETE",
        }
    ]
    assert (fetch["event_type"], fetch["customer_id"], fetch["status"]) == ("api_call", "c1", "quarantined")
    assert fetch["payload"]["properties"]["method"] == "FETCH"
    assert fetch["timestamp"] == RECENT.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for name in ("timestamp", "received_at", "quarantined_at"):
        assert TIME_RE.match(fetch[name]), fetch[name]
    assert by_id["bad-bytes"]["reasons"][0]["reason"] == "type"
    assert by_id["tele-1"]["reasons"][0]["reason"] == "unknown_event_type"
    raw = by_id[None]
    assert raw["reasons"][0]["reason"] == "not_json" and raw["payload"] is None
    assert raw["payload_text"] == "this is not json"

    def ids(params: Any) -> set[str | None]:
        return {d["id"] for d in listing(gateway_url, params)["data"]}

    assert ids({"reason": "enum"}) == {"late-comer", "fetch-1", "fetch-2", "hdr-1"}
    assert ids({"reason": "enum,type"}) == {"late-comer", "fetch-1", "fetch-2", "hdr-1", "bad-bytes"}
    assert ids([("reason", "not_json"), ("reason", "unknown_event_type")]) == {None, "tele-1"}
    assert ids({"event_type": "teleport"}) == {"tele-1"}
    assert ids({"customer_id": "c2"}) == {"fetch-2"}
    assert ids({"reason": "enum", "customer_id": "c9"}) == {"late-comer"}
    assert ids({"reason": "min"}) == set()
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids({"from": future}) == set()
    assert len(ids({"from": past, "to": future})) == 7
    assert ids({"status": "replayed"}) == set()
    assert len(ids({"status": "all"})) == 7

    # Pages of 3, newest first, covering every row exactly once.
    pages, offset = [], 0
    while True:
        answer = listing(gateway_url, {"limit": 3, "offset": offset})
        pages.append([d["quarantine_id"] for d in answer["data"]])
        if "next_offset" not in answer:
            break
        offset = answer["next_offset"]
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [q for p in pages for q in p]
    assert flat == [d["quarantine_id"] for d in data]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "5000"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"status": "lost"}, "status"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, "from"),
        ({"reason": "Not A Reason!"}, "reason"),
        ({"event-type": "api_call"}, "event-type"),
        ([("status", "quarantined"), ("status", "replayed")], "status"),
    ],
)
def test_list_rejects_bad_parameters(gateway_url, params, field):
    response = get(gateway_url, "/v1/quarantine", params)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "details"} and body["error"]
    assert [d["field"] for d in body["details"]] == [field]


# --- replay ---------------------------------------------------------------------------------------------


def test_replay_after_catalog_fix_stores_each_event_once(
    gateway_url, nats_server, database_url, catalog, fixed_catalog
):
    publish_broken(nats_server.url)
    # And one through the gateway (its events reach the pipeline normalized, in a batch message),
    # too late as well as of an unknown method.
    old = (datetime.now(UTC) - timedelta(days=40)).astimezone(timezone(timedelta(hours=2)))
    response = httpx.post(
        f"{gateway_url}/v1/events",
        json=api_call(
            "gw-fetch", customer="c4", method="FETCH", ts=old.strftime("%Y-%m-%dT%H:%M:%S.%f7+02:00")
        ),
        timeout=30,
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    run_drain(nats_server.url, database_url, catalog)
    assert api_calls_count(database_url) == 2
    before = status(gateway_url)["events"]
    assert (before["processed"], before["stored"], before["duplicates"], before["quarantined"]) == (
        9,
        2,
        0,
        7,
    )
    assert before["replayed_from_quarantine"] == 0
    gw_reasons = scalar(database_url, "SELECT reasons FROM quarantined_events WHERE event_id = 'gw-fetch'")
    assert sorted(r["reason"] for r in gw_reasons) == ["enum", "too_late"]

    summary = replay_quarantine(database_url, fixed_catalog)
    assert summary.replay_id is not None and summary.balanced
    # fetch-1, fetch-2, hdr-1 and tele-1 now pass; bad-bytes, the non-JSON message and gw-fetch (too
    # late) still fail.
    assert (summary.examined, summary.stored, summary.duplicates, summary.still_quarantined) == (7, 4, 0, 3)
    assert summary.still_reasons.most_common(1)[0][1] == 1

    # Counted once, in the aggregates too: exactly the replayed api_calls were added.
    assert api_calls_count(database_url) == 2 + 3
    assert bytes_sum(database_url) == 10 + 20 + 100 + 200 + 300
    assert scalar(database_url, "SELECT count(*) FROM usage_events") == 2 + 4
    assert (
        scalar(database_url, "SELECT properties->>'method' FROM usage_events WHERE id = 'hdr-1'") == "FETCH"
    )
    assert scalar(database_url, "SELECT ts FROM usage_events WHERE id = 'fetch-1'") == RECENT
    assert states(database_url) == {
        "fetch-1": "replayed",
        "fetch-2": "replayed",
        "hdr-1": "replayed",
        "tele-1": "replayed",
        "bad-bytes": "quarantined",
        "gw-fetch": "quarantined",
        "(raw)": "quarantined",
    }
    moved = query(
        database_url,
        "SELECT replay_id, resolved_at IS NOT NULL FROM quarantined_events WHERE status = 'replayed'",
    )
    assert moved == [(summary.replay_id, True)] * 4
    # Still failing: reasons are those of the current catalog (gw-fetch's method is fine now).
    reasons = dict(query(database_url, "SELECT coalesce(event_id, '(raw)'), reasons FROM quarantined_events"))
    assert [r["reason"] for r in reasons["gw-fetch"]] == ["too_late"]
    assert reasons["bad-bytes"][0]["reason"] == "type"
    assert reasons["(raw)"][0]["reason"] == "not_json"

    # The ledger balances and shows the move.
    after = status(gateway_url)["events"]
    assert after["processed"] == 9 and after["balanced"]
    assert (after["stored"], after["duplicates"], after["quarantined"]) == (6, 0, 3)
    assert after["stored"] + after["duplicates"] + after["quarantined"] == after["processed"]
    assert after["replayed_from_quarantine"] == 4
    assert replay_ledger_rows(database_url) == [(summary.replay_id, 7, 4, 0, 3, True)]
    assert get(gateway_url, "/v1/events/fetch-2").json()["state"] == "stored"
    assert {d["id"] for d in listing(gateway_url, {"status": "replayed"})["data"]} == {
        "fetch-1",
        "fetch-2",
        "hdr-1",
        "tele-1",
    }
    assert {d["id"] for d in listing(gateway_url)["data"]} == {"bad-bytes", "gw-fetch", None}
    usage = get(gateway_url, "/v1/meters/api_calls/usage", {"group_by": "customer_id"}).json()["data"]
    assert {r["customer_id"]: r["value"] for r in usage} == {"c1": 3, "c2": 2}

    # A second replay finds nothing new to count.
    again = replay_quarantine(database_url, fixed_catalog)
    assert (again.examined, again.stored, again.duplicates, again.still_quarantined) == (3, 0, 0, 3)
    assert api_calls_count(database_url) == 5
    assert bytes_sum(database_url) == 630
    assert status(gateway_url)["events"] == after
    assert [r[1:] for r in replay_ledger_rows(database_url)] == [(7, 4, 0, 3, True), (3, 0, 0, 3, True)]

    # A resend of a replayed event is a duplicate at ingestion.
    publish(nats_server.url, api_call("fetch-1", method="FETCH", bytes_transferred=100))
    counts = run_drain(nats_server.url, database_url, fixed_catalog)
    assert (counts.stored, counts.duplicates, counts.quarantined) == (0, 1, 0)
    assert api_calls_count(database_url) == 5


def test_replay_counts_an_id_stored_meanwhile_as_a_duplicate(
    gateway_url, nats_server, database_url, catalog, fixed_catalog
):
    # Quarantined first, then the sender resends them valid: stored and counted by that resend.
    publish(
        nats_server.url,
        [
            api_call("dup-1", method="FETCH", bytes_transferred=1),
            api_call("dup-2", bytes_transferred="lots"),  # fails even after the fix
            api_call("new-1", method="FETCH", bytes_transferred=5),
        ],
    )
    run_drain(nats_server.url, database_url, catalog)
    publish(nats_server.url, [api_call("dup-1", bytes_transferred=1), api_call("dup-2", bytes_transferred=2)])
    run_drain(nats_server.url, database_url, catalog)
    assert api_calls_count(database_url) == 2 and bytes_sum(database_url) == 3
    assert status(gateway_url)["events"]["quarantined"] == 3

    summary = replay_quarantine(database_url, fixed_catalog)
    assert (summary.examined, summary.stored, summary.duplicates, summary.still_quarantined) == (3, 1, 2, 0)
    # Only new-1 is added: the duplicates' (valid) payloads must not be aggregated again.
    assert api_calls_count(database_url) == 3
    assert bytes_sum(database_url) == 3 + 5
    assert states(database_url) == {"dup-1": "duplicate", "dup-2": "duplicate", "new-1": "replayed"}
    events = status(gateway_url)["events"]
    assert (events["processed"], events["stored"], events["duplicates"], events["quarantined"]) == (
        5,
        3,
        2,
        0,
    )
    assert events["balanced"] and events["duplicates_from_quarantine"] == 2
    assert replay_ledger_rows(database_url)[0][1:5] == (3, 1, 2, 0)


def test_replay_filters_dry_run_and_lateness(nats_server, database_url, catalog, fixed_catalog):
    old = (datetime.now(UTC) - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    publish(
        nats_server.url,
        [
            api_call("f-1", method="FETCH"),
            api_call("f-2", customer="c2", method="FETCH"),
            {"id": "t-1", "event_type": "teleport", "customer_id": "c1", "timestamp": RECENT.isoformat()},
            api_call("old-1", ts=old),
        ],
    )
    run_drain(nats_server.url, database_url, catalog)

    dry = replay_quarantine(database_url, fixed_catalog, dry_run=True)
    assert dry.dry_run and dry.replay_id is None
    assert (dry.examined, dry.stored, dry.duplicates, dry.still_quarantined) == (4, 3, 0, 1)
    assert dry.still_reasons == {"timestamp: is more than 35 days before the event was received": 1}
    assert set(states(database_url).values()) == {"quarantined"}
    assert api_calls_count(database_url) == 0
    assert replay_ledger_rows(database_url) == []

    only_c2 = replay_quarantine(database_url, fixed_catalog, QuarantineFilter(customer_id="c2"))
    assert (only_c2.examined, only_c2.stored) == (1, 1)
    teleports = replay_quarantine(database_url, fixed_catalog, QuarantineFilter(event_type="teleport"))
    assert (teleports.examined, teleports.stored) == (1, 1)
    enums = replay_quarantine(database_url, fixed_catalog, QuarantineFilter(reasons=("enum",)))
    assert (enums.examined, enums.stored) == (1, 1)
    assert states(database_url) == {
        "f-1": "replayed",
        "f-2": "replayed",
        "t-1": "replayed",
        "old-1": "quarantined",
    }
    # Lateness is checked as at ingestion (against the original receive time); allowing more of it
    # lets the late event in, in its own old minute.
    late = replay_quarantine(database_url, fixed_catalog, max_lateness=timedelta(days=45))
    assert (late.examined, late.stored) == (1, 1)
    assert api_calls_count(database_url) == 3
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls' AND minute < now() - interval '39 days'",
        )
        == 1
    )


def test_concurrent_replays_never_take_the_same_event(nats_server, database_url, catalog, fixed_catalog):
    n = 400
    publish(
        nats_server.url,
        [api_call(f"c-{i}", customer=f"cust-{i % 7}", method="FETCH", bytes_transferred=i) for i in range(n)],
    )
    run_drain(nats_server.url, database_url, catalog)
    results: list[ReplaySummary] = []
    errors: list[BaseException] = []

    def replay() -> None:
        try:
            results.append(replay_quarantine(database_url, fixed_catalog, chunk_size=25))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(r.stored for r in results) == n
    assert sum(r.examined for r in results) == n
    assert sum(r.duplicates for r in results) == 0
    assert api_calls_count(database_url) == n
    assert bytes_sum(database_url) == sum(range(n))
    ledger = replay_ledger_rows(database_url)
    assert len(ledger) == 3 and sum(r[2] for r in ledger) == n and all(r[5] for r in ledger)


def test_impossible_dates_published_directly_are_quarantined_not_wedging(
    gateway_url, nats_server, database_url, catalog
):
    publish(
        nats_server.url,
        [
            api_call("month-13", ts="2025-13-01T00:00:00Z"),
            api_call("year-0", ts="0000-01-01T00:00:00Z"),
            api_call("fine"),
        ],
    )
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.quarantined) == (3, 1, 2)
    data = listing(gateway_url, {"reason": "invalid_envelope"})["data"]
    assert {d["id"] for d in data} == {"month-13", "year-0"}
    assert all(d["reasons"][0]["field"] == "timestamp" for d in data)


# --- the commands ------------------------------------------------------------------------------------


def test_meter_quarantine_list_and_replay(
    gateway_url, nats_server, database_url, catalog, fixed_catalog, capsys, monkeypatch, tmp_path
):
    publish_broken(nats_server.url)
    run_drain(nats_server.url, database_url, catalog)

    assert main(["quarantine", "list", "--gateway", gateway_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "event_type", "customer", "quarantined_at", "reasons"]
    fetch = next(line for line in lines if line.startswith("fetch-1 "))
    assert "api_call" in fetch and "properties.method: must be one of GET, POST, PUT, PATCH, DELETE" in fetch
    assert any("not an event" in line and "the message is not valid JSON" in line for line in lines)
    assert len(lines) == 1 + 6

    assert main(["quarantine", "list", "--reason", "type", "--json", "--gateway", gateway_url]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in answer["data"]] == ["bad-bytes"]
    assert main(["quarantine", "list", "--event-type", "teleport", "--gateway", gateway_url]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("tele-1 ")
    assert main(["quarantine", "list", "--limit", "2", "--gateway", gateway_url]) == 0
    assert "repeat with --offset 2" in capsys.readouterr().out
    assert main(["quarantine", "list", "--limit", "0", "--gateway", gateway_url]) == 2
    assert "limit" in capsys.readouterr().err

    # replay finds the database of the running `meter up` in .meter/runtime.json ...
    monkeypatch.delenv("METER_DATABASE_URL", raising=False)
    monkeypatch.setenv("METER_HOME", str(tmp_path))
    (tmp_path / ".meter").mkdir()
    (tmp_path / ".meter" / "runtime.json").write_text(json.dumps({"database_url": database_url}))
    assert fixed_catalog.directory is not None
    monkeypatch.setenv("METER_CATALOG_DIR", str(fixed_catalog.directory))
    assert main(["quarantine", "replay", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "examined 6" in out and "would be stored:       4" in out and "nothing was written" in out
    assert api_calls_count(database_url) == 2

    assert main(["quarantine", "replay", "--reason", "enum", "--chunk-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "examined 3" in out and "now stored:       3" in out and "still quarantined: 0" in out
    assert main(["quarantine", "replay"]) == 0
    out = capsys.readouterr().out
    assert "examined 3" in out and "now stored:       1" in out and "still quarantined: 2" in out
    assert "properties.bytes_transferred: " in out and "the message is not valid JSON" in out
    assert api_calls_count(database_url) == 5

    assert main(["status", "--gateway", gateway_url]) == 0
    out = capsys.readouterr().out
    assert "events processed 8 = stored 6 + duplicates 0 + quarantined 2  (balanced)" in out
    assert "moved out of quarantine by replays: 4 stored, 0 duplicates" in out

    # ... or METER_DATABASE_URL; without either it says what to do.
    monkeypatch.setenv("METER_HOME", str(tmp_path / "elsewhere"))
    assert main(["quarantine", "replay"]) == 2
    assert "METER_DATABASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("METER_DATABASE_URL", database_url)
    assert main(["quarantine", "replay"]) == 0
    assert "examined 2" in capsys.readouterr().out
