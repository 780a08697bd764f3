"""GET /metrics against the real gateway, JetStream and PostgreSQL: counters move by exactly what was
sent and drained, labels are route templates, the text parses, and a scrape never hangs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ingest_gateway.metrics_pipeline import Snapshot, StreamFigures, families
from meter_platform.runtime.launch import PROMETHEUS_MULTIPROC_DIR, gateway_command, gateway_env, platform_env
from meter_platform.runtime.servers import free_port
from tests.helpers import api_call, run_drain
from tests.test_gateway import frozen, wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "meter-platform.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> tuple[Samples, str]:
    """Every sample of one scrape, keyed by (name, labels); and the text."""
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):  # raises on text it cannot parse
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, response.text


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def post(base: str, key: str, body: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/events", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_counters_move_by_exactly_what_was_sent_and_drained(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    before, _ = scrape(gateway_url)
    auth = {"Authorization": f"Bearer {admin_key}"}
    assert (
        post(gateway_url, admin_key, [api_call("m-1"), api_call("m-2"), api_call("m-3")]).status_code == 202
    )
    assert post(gateway_url, admin_key, api_call("m-1")).status_code == 202  # a duplicate id
    invalid = api_call("m-bad")
    del invalid["properties"]["endpoint"]  # required by the catalog: quarantined by the pipeline
    assert post(gateway_url, admin_key, invalid).status_code == 202
    assert httpx.get(f"{gateway_url}/v1/events/m-2", headers=auth).status_code == 200  # pending
    assert httpx.get(f"{gateway_url}/v1/events/raw-id-zz9", headers=auth).status_code == 404
    assert httpx.get(f"{gateway_url}/v1/meters").status_code == 401  # refused by auth: counted too
    assert httpx.get(f"{gateway_url}/no/such/path-77").status_code == 404

    sent, text = scrape(gateway_url)
    events = "/v1/events"
    assert delta(before, sent, "meter_http_requests_total", route=events, method="POST", status="202") == 3
    one = "/v1/events/{event_id}"
    assert delta(before, sent, "meter_http_requests_total", route=one, method="GET", status="200") == 1
    assert delta(before, sent, "meter_http_requests_total", route=one, method="GET", status="404") == 1
    assert (
        delta(before, sent, "meter_http_requests_total", route="/v1/meters", method="GET", status="401") == 1
    )
    assert (
        delta(before, sent, "meter_http_requests_total", route="unmatched", method="GET", status="404") == 1
    )
    # The first scrape is counted once it has answered, so the second one sees it.
    assert delta(before, sent, "meter_http_requests_total", route="/metrics", method="GET", status="200") == 1
    assert delta(before, sent, "meter_http_request_duration_seconds_count", route=events, method="POST") == 3
    assert "raw-id-zz9" not in text and "m-2" not in text and "path-77" not in text  # templates only
    assert delta(before, sent, "meter_events_accepted_total") == 5
    assert delta(before, sent, "meter_publish_seconds_count") == 3
    assert delta(before, sent, "meter_publish_seconds_sum") > 0
    assert delta(before, sent, "meter_publish_failures_total", reason="not_confirmed") == 0
    # The backlog: three messages (one per request) waiting, none in the ledger yet.
    assert value(sent, "meter_scrape_dependency_up", dependency="nats") == 1
    assert value(sent, "meter_scrape_dependency_up", dependency="postgres") == 1
    assert value(sent, "meter_jetstream_stream_last_seq") == 3
    assert value(sent, "meter_jetstream_consumer_pending") == 3
    assert value(sent, "meter_jetstream_consumer_uncounted") == 3
    assert value(sent, "meter_pipeline_oldest_waiting_seconds") > 0

    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.events, counts.stored, counts.duplicates, counts.quarantined) == (5, 3, 1, 1)
    drained, _ = scrape(gateway_url)
    assert delta(sent, drained, "meter_pipeline_events_processed_total") == 5
    assert delta(sent, drained, "meter_pipeline_events_stored_total") == 3
    assert delta(sent, drained, "meter_pipeline_events_duplicates_total") == 1
    assert delta(sent, drained, "meter_pipeline_events_quarantined_total") == 1
    assert delta(sent, drained, "meter_pipeline_messages_total") == 3
    assert value(drained, "meter_quarantine_open") == 1
    assert value(drained, "meter_jetstream_consumer_uncounted") == 0
    assert value(drained, "meter_jetstream_consumer_pending") == 0
    assert value(drained, "meter_pipeline_oldest_waiting_seconds") == 0
    assert abs(value(drained, "meter_pipeline_last_commit_timestamp_seconds") - time.time()) < 60
    assert abs(value(drained, "meter_pipeline_newest_received_timestamp_seconds") - time.time()) < 60
    # From receipt to the batch's write: the events waited in JetStream since they were posted.
    longest = value(drained, "meter_pipeline_batch_delay_seconds", stat="max")
    assert 0 < value(drained, "meter_pipeline_batch_delay_seconds", stat="min") <= longest < 60


def test_route_labels_are_templates_for_every_route(gateway_url):
    """The label set stays bounded: no label value is a raw path segment of a request."""
    for i in range(5):
        httpx.get(f"{gateway_url}/v1/events/id-{i}")  # 401 without a key, counted by template
        httpx.get(f"{gateway_url}/v1/invoices/inv-{i}.html")
    samples, _ = scrape(gateway_url)
    routes = {dict(labels)["route"] for name, labels in samples if name == "meter_http_requests_total"}
    assert "/v1/events/{event_id}" in routes and "/v1/invoices/{invoice_id}.html" in routes
    assert not any("id-" in r or "inv-" in r for r in routes), routes


def test_openapi_documents_metrics_as_public_text(gateway_url):
    doc = httpx.get(f"{gateway_url}/openapi.json").json()
    operation = doc["paths"]["/metrics"]["get"]
    assert operation["security"] == []
    assert "text/plain" in operation["responses"]["200"]["content"]


def test_scrape_answers_in_time_without_postgres_figures_while_postgres_is_frozen(gateway_url, pg_server):
    scrape(gateway_url)  # the pool is warm
    with frozen(pg_server.process.pid):
        for _ in range(2):  # the second finds the first query still waiting: no pile-up
            started = time.monotonic()
            samples, _ = scrape(gateway_url)
            assert time.monotonic() - started < 3
            assert value(samples, "meter_scrape_dependency_up", dependency="postgres") == 0
            assert value(samples, "meter_scrape_dependency_up", dependency="nats") == 1
            assert ("meter_pipeline_events_stored_total", frozenset()) not in samples
            assert ("meter_jetstream_stream_last_seq", frozenset()) in samples
    wait_until(
        lambda: value(scrape(gateway_url)[0], "meter_scrape_dependency_up", dependency="postgres") == 1
    )


def test_scrape_answers_in_time_without_nats_figures_while_nats_is_frozen(gateway_url, nats_server):
    scrape(gateway_url)
    with frozen(nats_server.server.process.pid):
        started = time.monotonic()
        samples, _ = scrape(gateway_url)
        assert time.monotonic() - started < 3
        assert value(samples, "meter_scrape_dependency_up", dependency="nats") == 0
        assert value(samples, "meter_scrape_dependency_up", dependency="postgres") == 1
        assert ("meter_jetstream_stream_last_seq", frozenset()) not in samples
        assert ("meter_pipeline_events_stored_total", frozenset()) in samples
    wait_until(lambda: value(scrape(gateway_url)[0], "meter_scrape_dependency_up", dependency="nats") == 1)


@pytest.fixture
def two_workers(settings, clean, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The gateway as `meter up` runs it with METER_GATEWAY_WORKERS=2 (uvicorn, two processes)."""
    port = free_port()
    env = platform_env(settings.nats_url or "", settings.database_url or "", tmp_path)
    env.pop(PROMETHEUS_MULTIPROC_DIR, None)
    env = gateway_env(env, tmp_path / ".meter", workers=2)
    folder = Path(env[PROMETHEUS_MULTIPROC_DIR])
    proc = subprocess.Popen(gateway_command("127.0.0.1", port, workers=2), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/healthz"), timeout=60)
        yield base, folder
    finally:
        proc.terminate()
        proc.wait(20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _healthz_per_worker(folder: Path) -> dict[str, float]:
    """GET /healthz 200s counted by each worker, read from that worker's own file."""
    out = {}
    for path in folder.glob("counter_*.db"):
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            for s in metric.samples:
                if s.name == "meter_http_requests_total" and s.labels.get("route") == "/healthz":
                    total += s.value
        out[path.stem.rsplit("_", 1)[-1]] = total
    return out


def test_several_workers_add_up_in_multiprocess_mode(two_workers):
    base, folder = two_workers
    before, _ = scrape(base)
    first = _healthz_per_worker(folder)

    def get(_: int) -> int:  # a new connection each time, 8 at once: both workers take some
        return httpx.get(f"{base}/healthz", headers={"Connection": "close"}, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, range(80))) == {200}
    served = {pid: n - first.get(pid, 0) for pid, n in _healthz_per_worker(folder).items()}
    assert sum(served.values()) == 80 and len([n for n in served.values() if n > 0]) == 2, served
    for _ in range(4):  # whichever worker answers the scrape, /metrics shows the sum of both
        after, _ = scrape(base)
        assert (
            delta(before, after, "meter_http_requests_total", route="/healthz", method="GET", status="200")
            == 80
        )


def test_the_grafana_dashboard_uses_only_metrics_the_gateway_serves(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    """docs/grafana/meter-platform.json stays true: every meter_* series its queries name exists."""
    assert post(gateway_url, admin_key, api_call("dash-1")).status_code == 202
    run_drain(nats_server.url, database_url, catalog)  # the pipeline's gauges need a batch
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    _, text = scrape(gateway_url)
    served = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    named = {name for expr in exprs for name in re.findall(r"\bmeter_\w+", expr)}
    missing = {n for n in named if n not in served and re.sub(r"_(bucket|sum|count)$", "", n) not in served}
    assert not missing, missing


def test_families_leave_out_what_a_dependency_did_not_tell():
    """The pure part: without PostgreSQL the backlog's uncounted is unknown (left out, not 0)."""
    stream = StreamFigures(
        last_seq=10,
        first_seq=6,
        messages=5,
        bytes=1,
        created=None,
        pending=5,
        ack_pending=0,
        ack_floor=5,
        oldest_waiting=None,
    )
    names = {m.name for m in families(Snapshot(stream=stream))}
    assert "meter_jetstream_consumer_pending" in names and "meter_jetstream_consumer_uncounted" not in names
    assert not any(n.startswith("meter_pipeline_events") for n in names)
    nothing = {m.name: m for m in families(Snapshot())}
    assert {s.value for s in nothing["meter_scrape_dependency_up"].samples} == {0}
    assert set(nothing) == {"meter_scrape_dependency_up", "meter_scrape_read_seconds"}
