"""Alerts end to end: check outcomes in the real PostgreSQL, the alert sensor ticking as a function (and
in a fresh process for restarts), a real HTTP receiver on a free port that checks every signature."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, Definitions, SkipReason, build_sensor_context

from meter_platform import alerts, quality
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.defs.quality.sensors import data_quality_alert_sensor
from meter_platform.defs.resources import CatalogResource, PostgresResource
from meter_platform.runtime.servers import free_port
from meter_platform.storage import db

SECRET = "s3cret-for-tests"
SECRET_ENV = "METER_TEST_ALERT_SECRET"
CHECK = "aggregates_reconcile_with_raw_events"
ASSET = "usage_minute_aggregates"
ALERT_TABLES = ("alert_deliveries", "alert_episodes", "quality_check_results")


@dataclass
class Received:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A real webhook receiver: records every request and answers the scripted statuses, then 200."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: list[int] = []
        self.delay = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(receiver.delay)
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(Received(dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    @property
    def accepted(self) -> list[Received]:
        """The requests answered 2xx: what the receiver's side counts as delivered."""
        return [r for r in self.requests if 200 <= r.status < 300]


@pytest.fixture
def alert_db(database_url: str) -> str:
    """The platform database with empty check results, episodes and deliveries."""
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(ALERT_TABLES)} RESTART IDENTITY CASCADE")
    return database_url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real HTTP receiver in a background thread on a free port."""
    rec = Receiver()
    thread = threading.Thread(target=rec.server.serve_forever, name="alert-receiver", daemon=True)
    thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()
    thread.join(10)


def write_alerts(
    catalog_dir: Path, receiver: Receiver, webhook_min: str = "WARN", log_min: str = "WARN"
) -> Path:
    catalog_dir.mkdir(parents=True, exist_ok=True)
    (catalog_dir / "alerts.yaml").write_text(
        f"""
channels:
  - name: ops-webhook
    type: webhook
    url: {receiver.url}
    secret_env: {SECRET_ENV}
    min_severity: {webhook_min}
  - name: log
    type: log
    min_severity: {log_min}
"""
    )
    return catalog_dir


@pytest.fixture
def catalog_dir(tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalog folder whose alerts.yaml has the receiver's webhook (every severity) and the log."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return write_alerts(tmp_path / "catalog", receiver)


def record(database_url: str, passed: bool, severity: str = "ERROR", check: str = CHECK) -> None:
    """Store one evaluation of a check, as the checks do."""
    outcome = quality.CheckOutcome(
        check_name=check,
        asset=ASSET,
        passed=passed,
        severity=severity,
        description="aggregates match the raw events" if passed else "3 minutes differ from the raw events",
        metadata={} if passed else {"minutes": 3, "first": "2025-07-24T10:30:00Z"},
    )
    with db.connect(database_url) as conn:
        quality.record(conn, outcome)
        conn.commit()


def tick(database_url: str, catalog_dir: Path | str) -> str:
    """One sensor tick with fresh resources and a fresh instance; the SkipReason's message."""
    context = build_sensor_context(
        instance=DagsterInstance.ephemeral(),
        resources={
            "postgres": PostgresResource(url=database_url),
            "catalog": CatalogResource(catalog_dir=str(catalog_dir)),
        },
    )
    result = data_quality_alert_sensor(context)
    assert isinstance(result, SkipReason), result
    return result.skip_message or ""


_TICK_IN_NEW_PROCESS = """
import sys
from dagster import DagsterInstance, build_sensor_context
from meter_platform.defs.quality.sensors import data_quality_alert_sensor
from meter_platform.defs.resources import CatalogResource, PostgresResource
context = build_sensor_context(
    instance=DagsterInstance.ephemeral(),
    resources={"postgres": PostgresResource(url=sys.argv[1]), "catalog": CatalogResource(catalog_dir=sys.argv[2])},
)
print(data_quality_alert_sensor(context).skip_message)
"""


def tick_in_new_process(database_url: str, catalog_dir: Path) -> str:
    """A sensor tick in a new Python process: a daemon restart, with only the database in common."""
    done = subprocess.run(
        [sys.executable, "-c", _TICK_IN_NEW_PROCESS, database_url, str(catalog_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, SECRET_ENV: SECRET},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def deliveries(database_url: str) -> list[tuple]:
    """Every outbox row: (kind, channel, episode_id, delivered, attempts), oldest first."""
    with db.connect(database_url) as conn:
        return conn.execute(
            "SELECT kind, channel, episode_id, delivered_at IS NOT NULL, attempts"
            " FROM alert_deliveries ORDER BY created_at, kind, channel"
        ).fetchall()


def make_due(database_url: str) -> None:
    """Let the backoff elapse: every pending notice may be tried on the next tick."""
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE alert_deliveries SET next_attempt_at = now() WHERE delivered_at IS NULL")


def assert_signed(request: Received, secret: str = SECRET) -> dict[str, Any]:
    """The request's signature verifies on the exact body, and its delivery header matches the body."""
    assert alerts.verify_signature(secret, request.body, request.headers["X-Meter-Signature"])
    payload = request.json
    assert request.headers["X-Meter-Delivery"] == payload["delivery_id"]
    assert request.headers["X-Meter-Event"] == payload["event"]
    assert abs(int(request.headers["X-Meter-Timestamp"]) - time.time()) < 120
    assert request.headers["Content-Type"] == "application/json"
    return payload


# -- the sensor against the receiver ---------------------------------------------------------------


def test_a_failing_check_is_alerted_once_with_a_valid_signature(alert_db, receiver, catalog_dir):
    assert "0 alerts sent" in tick(alert_db, catalog_dir)  # nothing recorded yet
    record(alert_db, passed=False)
    summary = tick(alert_db, catalog_dir)
    assert summary.startswith("2 alerts sent, 0 recovery notices sent, 0 pending; 1 episode opened"), summary

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    payload = assert_signed(request)
    assert not alerts.verify_signature("another-secret", request.body, request.headers["X-Meter-Signature"])
    assert not alerts.verify_signature(SECRET, request.body + b" ", request.headers["X-Meter-Signature"])
    assert payload["event"] == "alert"
    assert payload["check"] == CHECK and payload["asset"] == ASSET and payload["severity"] == "ERROR"
    assert payload["description"] == "3 minutes differ from the raw events"
    assert payload["metadata"] == {"minutes": 3, "first": "2025-07-24T10:30:00Z"}
    assert payload["opened_at"] and payload["closed_at"] is None and payload["passed"] is False

    # Still failing, recorded again and again: no second alert, on any channel.
    for _ in range(3):
        record(alert_db, passed=False)
        summary = tick(alert_db, catalog_dir)
        assert summary.startswith("0 alerts sent, 0 recovery notices sent, 0 pending; 0 episodes opened")
    assert len(receiver.requests) == 1
    assert deliveries(alert_db) == [
        ("alert", "log", payload["episode_id"], True, 1),
        ("alert", "ops-webhook", payload["episode_id"], True, 1),
    ]


def test_a_receiver_answering_500_twice_gets_the_alert_once_after_retries(alert_db, receiver, catalog_dir):
    receiver.statuses = [500, 500]
    record(alert_db, passed=False)
    summary = tick(alert_db, catalog_dir)
    assert "0 pending" in summary, summary

    assert [r.status for r in receiver.requests] == [500, 500, 200]
    assert len({r.headers["X-Meter-Delivery"] for r in receiver.requests}) == 1  # one notice, retried
    for request in receiver.requests:
        assert_signed(request)
    assert len(receiver.accepted) == 1
    webhook = [d for d in deliveries(alert_db) if d[1] == "ops-webhook"]
    assert webhook == [("alert", "ops-webhook", 1, True, 3)]

    make_due(alert_db)
    tick(alert_db, catalog_dir)
    assert len(receiver.requests) == 3


def test_a_receiver_down_for_longer_is_retried_on_later_ticks_in_order(alert_db, receiver, catalog_dir):
    receiver.statuses = [500, 503, 502]
    record(alert_db, passed=False)
    summary = tick(alert_db, catalog_dir)
    assert "1 pending" in summary and "ops-webhook: HTTP 502" in summary, summary
    assert len(receiver.requests) == 3 and not receiver.accepted

    with db.connect(alert_db) as conn:
        row = conn.execute(
            "SELECT attempts, extract(epoch FROM next_attempt_at - now()), last_error"
            " FROM alert_deliveries WHERE channel = 'ops-webhook'"
        ).fetchone()
    assert row is not None
    attempts, backoff, error = row
    assert attempts == 3 and 20 < backoff <= 30 and error.startswith("HTTP 502")

    # Not due yet: the next tick leaves it alone. Meanwhile the check recovers; the recovery must wait
    # behind its alert rather than overtake it.
    record(alert_db, passed=True)
    summary = tick(alert_db, catalog_dir)
    assert "1 recovery notice sent, 2 pending" in summary, summary  # the log got it; the webhook waits
    assert len(receiver.requests) == 3

    make_due(alert_db)
    summary = tick(alert_db, catalog_dir)
    assert "1 alert sent, 1 recovery notice sent, 0 pending" in summary, summary
    assert [r.json["event"] for r in receiver.accepted] == ["alert", "recovery"]
    assert len(receiver.requests) == 5
    assert [d[3:] for d in deliveries(alert_db) if d[1] == "ops-webhook"] == [(True, 4), (True, 1)]


def test_a_restart_sends_nothing_twice(alert_db, receiver, catalog_dir):
    record(alert_db, passed=False)
    tick(alert_db, catalog_dir)
    assert len(receiver.requests) == 1

    # A new daemon process, same database: nothing to send.
    assert tick_in_new_process(alert_db, catalog_dir).startswith("0 alerts sent, 0 recovery notices sent")
    assert len(receiver.requests) == 1

    # A process that died after writing the outbox but before delivering: the next one delivers once.
    record(alert_db, passed=True)
    channels = alerts.load_channels(catalog_dir / "alerts.yaml")
    with db.connect(alert_db, autocommit=True) as conn:
        evaluation = alerts.evaluate(conn, quality.latest_outcomes(conn), channels)
    assert evaluation == alerts.Evaluation(opened=0, closed=1, enqueued=2)
    assert len(receiver.requests) == 1
    assert tick_in_new_process(alert_db, catalog_dir).startswith("0 alerts sent, 2 recovery notices sent")
    assert tick_in_new_process(alert_db, catalog_dir).startswith("0 alerts sent, 0 recovery notices sent")
    assert [r.json["event"] for r in receiver.requests] == ["alert", "recovery"]


def test_recovery_then_a_new_failure_opens_a_new_episode(alert_db, receiver, catalog_dir):
    record(alert_db, passed=False)
    tick(alert_db, catalog_dir)
    record(alert_db, passed=True)
    summary = tick(alert_db, catalog_dir)
    assert summary.startswith(
        "0 alerts sent, 2 recovery notices sent, 0 pending; 0 episodes opened, 1 closed"
    )
    record(alert_db, passed=True)
    tick(alert_db, catalog_dir)  # still passing: nothing

    alert, recovery = (assert_signed(r) for r in receiver.requests)
    assert recovery["event"] == "recovery" and recovery["passed"] is True
    assert recovery["episode_id"] == alert["episode_id"]
    assert recovery["opened_at"] == alert["opened_at"] and recovery["closed_at"] > recovery["opened_at"]
    assert recovery["description"] == "aggregates match the raw events"
    assert recovery["failure_description"] == "3 minutes differ from the raw events"

    record(alert_db, passed=False)
    summary = tick(alert_db, catalog_dir)
    assert summary.startswith("2 alerts sent, 0 recovery notices sent, 0 pending; 1 episode opened")
    assert len(receiver.requests) == 3
    again = assert_signed(receiver.requests[2])
    assert again["event"] == "alert" and again["episode_id"] != alert["episode_id"]
    assert len({r.headers["X-Meter-Delivery"] for r in receiver.requests}) == 3
    with db.connect(alert_db) as conn:
        episodes = conn.execute("SELECT closed_at IS NULL FROM alert_episodes ORDER BY episode_id").fetchall()
    assert episodes == [(False,), (True,)]


def test_min_severity_routes_warnings_away_from_an_error_only_channel(
    alert_db, receiver, catalog_dir, caplog
):
    write_alerts(catalog_dir, receiver, webhook_min="ERROR")
    caplog.set_level(logging.INFO, logger="meter_platform.alerts")
    record(alert_db, passed=False, severity="WARN")
    summary = tick(alert_db, catalog_dir)
    assert summary.startswith("1 alert sent"), summary
    assert receiver.requests == []
    assert [r.levelname for r in caplog.records if "ALERT WARN" in r.getMessage()] == ["WARNING"]

    # The failure escalates to ERROR within the same episode: the ERROR channel now gets its one alert,
    # the log channel (already alerted) nothing more.
    record(alert_db, passed=False, severity="ERROR")
    summary = tick(alert_db, catalog_dir)
    assert summary.startswith("1 alert sent"), summary
    assert len(receiver.requests) == 1 and assert_signed(receiver.requests[0])["severity"] == "ERROR"
    assert len([r for r in caplog.records if "ALERT" in r.getMessage()]) == 1

    record(alert_db, passed=True)
    assert tick(alert_db, catalog_dir).startswith("0 alerts sent, 2 recovery notices sent")


def test_a_warning_never_reaches_an_error_only_channel_even_on_recovery(alert_db, receiver, catalog_dir):
    write_alerts(catalog_dir, receiver, webhook_min="ERROR")
    record(alert_db, passed=False, severity="WARN")
    tick(alert_db, catalog_dir)
    record(alert_db, passed=True, severity="WARN")
    assert tick(alert_db, catalog_dir).startswith("0 alerts sent, 1 recovery notice sent")
    assert receiver.requests == []
    assert {d[1] for d in deliveries(alert_db)} == {"log"}


def test_the_log_channel_writes_one_line_per_notice(alert_db, caplog):
    caplog.set_level(logging.INFO, logger="meter_platform.alerts")
    record(alert_db, passed=False, check="ledger_continuity")
    tick(alert_db, EXAMPLE_CATALOG_DIR)  # the example catalog: the log channel only
    tick(alert_db, EXAMPLE_CATALOG_DIR)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "meter_platform.alerts"]
    assert len(lines) == 1
    level, message = lines[0]
    assert level == "WARNING"
    assert message.startswith(f"ALERT ERROR {ASSET}/ledger_continuity: 3 minutes differ from the raw events")

    record(alert_db, passed=True, check="ledger_continuity")
    tick(alert_db, EXAMPLE_CATALOG_DIR)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "meter_platform.alerts"]
    assert len(lines) == 2
    assert lines[1][0] == "INFO"
    assert lines[1][1].startswith(f"RECOVERED {ASSET}/ledger_continuity: aggregates match the raw events")


def test_concurrent_delivery_passes_send_each_notice_once(alert_db, receiver, catalog_dir):
    receiver.delay = 0.5
    record(alert_db, passed=False)
    channels = [c for c in alerts.load_channels(catalog_dir / "alerts.yaml") if c.type == "webhook"]
    with db.connect(alert_db, autocommit=True) as conn:
        alerts.evaluate(conn, quality.latest_outcomes(conn), channels)
    reports: list[alerts.DeliveryReport] = []

    def deliver() -> None:
        with db.connect(alert_db, autocommit=True) as conn:
            reports.append(alerts.deliver(conn, channels))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(receiver.requests) == 1
    assert sum(r.alerts_sent for r in reports) == 1 and len(reports) == 4


def test_the_sensor_resolves_in_a_code_location_without_a_job(alert_db):
    defs = Definitions(
        sensors=[data_quality_alert_sensor],
        resources={
            "postgres": PostgresResource(url=alert_db),
            "catalog": CatalogResource(catalog_dir=""),
        },
    )
    sensor_def = defs.resolve_sensor_def("data_quality_alert_sensor")
    assert sensor_def.minimum_interval_seconds == 30
    assert sensor_def.default_status.value == "RUNNING"
    assert sensor_def.targets == []


# -- alerts.yaml -----------------------------------------------------------------------------------


def test_the_example_catalog_alerts_to_the_log_only():
    assert alerts.load_channels(alerts.alerts_path(EXAMPLE_CATALOG_DIR)) == [
        alerts.AlertChannel(name="log", type="log")
    ]


def test_a_catalog_without_alerts_yaml_alerts_to_the_log(tmp_path):
    assert alerts.load_channels(tmp_path / "alerts.yaml") == list(alerts.DEFAULT_CHANNELS)


def test_every_mistake_in_alerts_yaml_is_reported(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text(
        """
channels:
  - name: pager
    type: pagerduty
  - name: no-url
    type: webhook
    secret_env: METER_TEST_SECRET_THAT_IS_SET
  - name: unset-secret
    type: webhook
    url: http://127.0.0.1:9/alerts
    secret_env: METER_TEST_SECRET_THAT_IS_NOT_SET
  - name: inline-secret
    type: webhook
    url: http://127.0.0.1:9/alerts
    secret: hunter2
    secret_env: METER_TEST_SECRET_THAT_IS_SET
  - name: log
    type: log
    min_severity: CRITICAL
  - name: log
    type: log
    min_sevrity: ERROR
"""
    )
    with pytest.raises(alerts.AlertConfigError) as caught:
        alerts.load_channels(path, environ={"METER_TEST_SECRET_THAT_IS_SET": "x"})
    message = str(caught.value)
    assert message.startswith(f"{path}: 7 problem(s):"), message
    for expected in (
        "channels[0] (pager): unknown type 'pagerduty'; use one of webhook, log",
        "channels[1] (no-url): a webhook needs exactly one of `url` or `url_env`",
        "channels[2] (unset-secret): environment variable METER_TEST_SECRET_THAT_IS_NOT_SET (secret_env) is not set",
        "channels[3] (inline-secret): a secret must not be written in the file",
        "channels[4] (log): min_severity 'CRITICAL' is not one of WARN, ERROR",
        "channels[5] (log): another channel has this name",
        "channels[5] (log): unknown key(s) ['min_sevrity']",
    ):
        assert expected in message, message
    assert "hunter2" not in message


def test_a_webhook_url_and_secret_come_from_the_environment(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text(
        "channels:\n  - {name: hook, type: webhook, url_env: HOOK_URL, secret_env: HOOK_SECRET, min_severity: error}\n"
    )
    env = {"HOOK_URL": "https://ops.example.com/hook", "HOOK_SECRET": "k"}
    (channel,) = alerts.load_channels(path, environ=env)
    assert (channel.url, channel.secret, channel.min_severity) == (
        "https://ops.example.com/hook",
        "k",
        "ERROR",
    )
    assert "'k'" not in repr(channel)
    with pytest.raises(alerts.AlertConfigError, match="HOOK_URL \\(url_env\\) is not set"):
        alerts.load_channels(path, environ={"HOOK_SECRET": "k"})


def test_a_broken_alerts_yaml_fails_the_tick_with_the_reason(alert_db, tmp_path):
    (tmp_path / "alerts.yaml").write_text("channels:\n  - {name: x, type: email}\n")
    with pytest.raises(alerts.AlertConfigError, match="unknown type 'email'"):
        tick(alert_db, tmp_path)


def test_verify_signature_rejects_what_it_should():
    body = b'{"event":"alert"}'
    header = alerts.sign("k", body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert alerts.verify_signature("k", body, header)
    assert alerts.verify_signature(b"k", body, header)
    assert not alerts.verify_signature("k", body, header.upper())
    assert not alerts.verify_signature("k", body, header[7:])
    assert not alerts.verify_signature("k", body, None)
    assert not alerts.verify_signature("k2", body, header)
    assert not alerts.verify_signature("k", body.replace(b"alert", b"recovery"), header)
