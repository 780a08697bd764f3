"""The ``meter`` command against a real gateway: help, usage (table and JSON) and status."""

from __future__ import annotations

import json

from meter_platform.cli import main
from tests.helpers import RECENT, api_call, publish, run_drain


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("up", "demo", "usage", "status", "migrate"):
        assert f"    {command} " in out


def test_usage_and_status_from_the_terminal(gateway_url, nats_server, database_url, catalog, capsys):
    publish(
        nats_server.url,
        [api_call("u1", bytes_transferred=100), api_call("u2", customer="c2", bytes_transferred=5)],
    )
    publish(nats_server.url, api_call("u1"))  # a resend
    run_drain(nats_server.url, database_url, catalog)
    start = RECENT.replace(second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")

    assert (
        main(
            [
                "usage",
                "bytes_transferred",
                "--from",
                start,
                "--group-by",
                "customer_id",
                "--json",
                "--gateway",
                gateway_url,
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert {(r["customer_id"], r["value"]) for r in answer["data"]} == {("c1", 100), ("c2", 5)}

    filtered = ["usage", "bytes_transferred", "--from", start, "--json", "--gateway", gateway_url]
    assert main([*filtered, "--filter", "customer_id=c2"]) == 0
    assert [r["value"] for r in json.loads(capsys.readouterr().out)["data"]] == [5]
    assert main([*filtered, "--filter", "customer_id"]) == 2
    assert "dimension=value" in capsys.readouterr().err

    assert main(["usage", "api_calls", "--from", start, "--window", "hour", "--gateway", gateway_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["window_start", "window_end", "customer_id"]
    assert table[2].split()[-1] == "2"

    assert main(["usage", "nope", "--gateway", gateway_url]) == 2
    assert "no meter 'nope'" in capsys.readouterr().err

    assert main(["status", "--gateway", gateway_url]) == 0
    status = capsys.readouterr().out
    assert "events processed 3 = stored 2 + duplicates 1 + quarantined 0  (balanced)" in status


def test_replay_rebuilds_a_damaged_meter_and_reports_the_difference(
    clean, nats_server, database_url, catalog, capsys, monkeypatch
):
    from meter_platform import quality
    from meter_platform.meters.aggregates import active_meters
    from meter_platform.storage import db

    publish(nats_server.url, [api_call("d1"), api_call("d2"), api_call("d3", customer="c2")])
    run_drain(nats_server.url, database_url, catalog)
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE usage_minute_aggregates SET event_count = event_count + 5"
            " WHERE meter_slug = 'api_calls' AND customer_id = 'c1'"
        )
        assert not quality.reconcile_aggregates(conn, active_meters(conn), quality.QualitySettings()).passed
    monkeypatch.setenv("METER_DATABASE_URL", database_url)

    assert main(["replay"]) == 0
    assert "every meter is active" in capsys.readouterr().out
    assert main(["replay", "nope"]) == 2
    assert main(["replay", "api_calls"]) == 0
    out = capsys.readouterr().out
    assert "meter api_calls rebuilt: 3 events re-aggregated; 1 of 2 customers changed" in out
    assert "c1: 7 -> 2" in out
    with db.connect(database_url) as conn:
        assert quality.reconcile_aggregates(conn, active_meters(conn), quality.QualitySettings()).passed
