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

    assert main(["usage", "api_calls", "--from", start, "--window", "hour", "--gateway", gateway_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["window_start", "window_end", "customer_id"]
    assert table[2].split()[-1] == "2"

    assert main(["usage", "nope", "--gateway", gateway_url]) == 2
    assert "no meter 'nope'" in capsys.readouterr().err

    assert main(["status", "--gateway", gateway_url]) == 0
    status = capsys.readouterr().out
    assert "events processed 3 = stored 2 + duplicates 1 + quarantined 0  (balanced)" in status
