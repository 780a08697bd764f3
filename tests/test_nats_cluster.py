"""NATS as a 3-node JetStream cluster: the events stream keeps 3 replicas, and one node killed (-9)
under load costs no acknowledged event.

A real cluster of three nats-servers (meter_platform/runtime/nats_cluster.py), the real gateway served
by uvicorn and pointed at the three URLs, real PostgreSQL, the real drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from nats.js.api import StreamInfo
from nats.js.errors import NotFoundError

from ingest_gateway.app import create_app
from meter_platform.capture import jetstream
from meter_platform.config import CONSUMER_NAME, STREAM_NAME, Settings
from meter_platform.runtime.nats_cluster import NatsCluster, start_nats_cluster
from meter_platform.runtime.supervisor import Supervisor
from meter_platform.runtime.up import prepare_stream
from tests.helpers import AUTH, api_call, query, run_drain, scalar, serve


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three nats-servers with JetStream as one cluster, each with its own store, on free ports."""
    cluster = start_nats_cluster(tmp_path_factory.mktemp("nats-cluster"), nodes=3)
    yield cluster
    cluster.stop()


async def _js_call(url: str, action):
    nc = await jetstream.connect(url, name="tests-cluster")
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def js_call(url: str, action):
    """Run ``action(js)`` on a fresh connection to ``url`` (one or several servers)."""
    return asyncio.run(_js_call(url, action))


async def _recreate(js, apply_limits: bool = False) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM_NAME)
    await jetstream.ensure_stream_and_consumer(js, apply_limits=apply_limits)


@pytest.fixture
def cluster_stream(nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> NatsCluster:
    """An empty events stream with 3 replicas (and its consumer) on the cluster."""
    monkeypatch.setenv("METER_STREAM_REPLICAS", "3")
    nats_cluster.wait_ready()
    js_call(nats_cluster.url, _recreate)
    return nats_cluster


def stream_info(url: str) -> StreamInfo:
    """The stream's info (with its cluster: leader and replicas)."""
    return js_call(url, lambda js: js.stream_info(STREAM_NAME))


def test_the_stream_and_its_consumer_have_three_replicas(cluster_stream: NatsCluster):
    info = stream_info(cluster_stream.url)
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.leader in {"n1", "n2", "n3"}
    assert sorted([info.cluster.leader] + [r.name for r in info.cluster.replicas or []]) == ["n1", "n2", "n3"]
    consumer = js_call(cluster_stream.url, lambda js: js.consumer_info(STREAM_NAME, CONSUMER_NAME))
    assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2


def test_meter_up_raises_the_replicas_of_an_existing_one_replica_stream(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("METER_STREAM_REPLICAS", "1")
    nats_cluster.wait_ready()
    js_call(nats_cluster.url, _recreate)
    js_call(nats_cluster.url, lambda js: js.publish("meter.events.api_call", b"{}"))
    assert stream_info(nats_cluster.url).config.num_replicas == 1
    monkeypatch.setenv("METER_STREAM_REPLICAS", "3")
    js_call(nats_cluster.url, lambda js: jetstream.ensure_stream_and_consumer(js, apply_limits=True))
    assert stream_info(nats_cluster.url).config.num_replicas == 3
    # JetStream scales a work-queue stream in place: the config changes at once, the two new replicas
    # join within seconds (about 10 s here) and the consumer, whose replicas follow the stream's, after.
    deadline = time.monotonic() + 45
    while True:
        info = stream_info(nats_cluster.url)
        consumer = js_call(nats_cluster.url, lambda js: js.consumer_info(STREAM_NAME, CONSUMER_NAME))
        peers = (info.cluster.replicas or []) if info.cluster else []
        consumer_peers = (consumer.cluster.replicas or []) if consumer.cluster else []
        if len(peers) == 2 and all(p.current for p in peers) and len(consumer_peers) == 2:
            break
        assert time.monotonic() < deadline, f"not scaled: stream {info.cluster}, consumer {consumer.cluster}"
        time.sleep(0.5)
    assert info.state.messages == 1 and consumer.num_pending == 1  # nothing lost by the scaling


@pytest.fixture
def cluster_gateway(clean, cluster_stream, database_url, admin_key, catalog, tmp_path: Path) -> Iterator[str]:
    """The real gateway app, pointed at the cluster's three URLs, served by uvicorn on a free port."""
    settings = Settings(nats_url=cluster_stream.url, database_url=database_url, data_dir=tmp_path / ".meter")
    with serve(create_app(settings, catalog), name="cluster-gateway") as url:
        yield url


@dataclass
class Sender:
    """Posts batches of fresh ids until stopped; a 503 is retried with the same ids until a 202."""

    url: str
    prefix: str
    batch: int
    stop: threading.Event
    acked: list[str] = field(default_factory=list)
    calls: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, answered, status)
    unacked: list[str] = field(default_factory=list)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                ids = [f"{self.prefix}-{n}-{i}" for i in range(self.batch)]
                n += 1
                self._send_until_acked(client, ids)

    def _send_until_acked(self, client: httpx.Client, ids: list[str]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sent = time.monotonic()
            response = client.post("/v1/events", json=[api_call(i, customer=self.prefix) for i in ids])
            self.calls.append((sent, time.monotonic(), response.status_code))
            if response.status_code == 202:
                self.acked.extend(ids)
                return
            assert response.status_code == 503, response.text
            time.sleep(0.05)
        self.unacked.extend(ids)


def wait_caught_up(url: str, node: str, timeout: float = 30) -> float:
    """Seconds until the stream's leader reports every replica (``node`` among them) current."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        cluster = stream_info(url).cluster
        peers = cluster.replicas or [] if cluster else []
        names = {cluster.leader if cluster else None} | {p.name for p in peers}
        if node in names and len(peers) == 2 and all(p.current and not p.offline for p in peers):
            return time.monotonic() - began
        time.sleep(0.2)
    raise AssertionError(f"node {node} did not catch up within {timeout}s: {stream_info(url).cluster}")


def outage(calls: list[tuple[float, float, int]], killed_at: float) -> tuple[float, float, float]:
    """(longest time without any 202 after the kill, first to last 503, the first 202 sent after the kill)."""
    ok = sorted(answered for _, answered, status in calls if status == 202)
    before = max((t for t in ok if t <= killed_at), default=killed_at)
    after = [t for t in ok if t > killed_at]
    gaps = [b - a for a, b in zip([before, *after], after, strict=False)]
    failed = [(s, a) for s, a, status in calls if status == 503]
    span = max(a for _, a in failed) - min(s for s, _ in failed) if failed else 0.0
    first_new = min((a for s, a, status in calls if status == 202 and s > killed_at), default=float("inf"))
    return max(gaps, default=0.0), span, first_new


@dataclass
class Drainer:
    """Drains the stream into PostgreSQL again and again while events arrive, as the pipeline's runs
    do; a drain that fails (its node died under it) is followed by the next, as a failed run is."""

    url: str
    database_url: str
    catalog: object
    stop: threading.Event
    stored: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.stored += run_drain(self.url, self.database_url, self.catalog).stored  # type: ignore[arg-type]
            except Exception as exc:  # the next drain picks up what this one left un-acked
                self.failures.append(repr(exc)[:200])
                time.sleep(0.5)


def kill_and_restart(cluster: NatsCluster, senders: list[Sender], sig: int) -> tuple[str, float, float]:
    """Signal the stream's leader (SIGKILL: kill -9; SIGTERM: a clean stop, as for an upgrade); once a request sent after the kill got its 202 and 2 s more went
    by with the node still down, let a supervisor restart it. (node, kill time, seconds to first 202)"""
    leader = cluster.node(stream_info(cluster.url).cluster.leader)
    assert leader.server is not None
    supervisor = Supervisor(print, first_delay=0.5)
    for node in cluster.nodes:
        supervisor.add(node.name, node.start, server=node.server)
    leader.server.process.send_signal(sig)  # SIGKILL: no goodbye to the cluster, no flush
    if sig == signal.SIGTERM:
        leader.server.process.wait(20)
    killed_at = time.monotonic()
    while outage([c for s in senders for c in s.calls], killed_at)[2] == float("inf"):
        assert time.monotonic() - killed_at < 30, "no 202 within 30 s of losing one node of three"
        time.sleep(0.1)
    recovered = outage([c for s in senders for c in s.calls], killed_at)[2] - killed_at
    time.sleep(2)
    assert leader.server.process.poll() is not None  # still down: those 202s came from two nodes
    while leader.server.process.poll() is not None:  # the supervisor restarts it, same port and store
        supervisor.poll()
        time.sleep(0.1)
    return leader.name, killed_at, recovered


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "stop"])
def test_losing_the_stream_leader_under_load_loses_and_doubles_nothing(
    cluster_gateway: str, cluster_stream: NatsCluster, database_url, catalog, sig: int
):
    stop = threading.Event()
    senders = [Sender(cluster_gateway, f"s{i}", batch, stop) for i, batch in enumerate((50, 50, 5))]
    drainer = Drainer(cluster_stream.url, database_url, catalog, stop)
    threads = [threading.Thread(target=w.run, daemon=True) for w in (*senders, drainer)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    leader, killed_at, recovered = kill_and_restart(cluster_stream, senders, sig)
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(90)
    caught_up = wait_caught_up(cluster_stream.url, leader)
    calls = [c for s in senders for c in s.calls]
    gap, span, _ = outage(calls, killed_at)
    counts = {c: sum(1 for *_, status in calls if status == c) for c in (202, 503)}
    print(f"{signal.Signals(sig).name} to leader {leader}; first 202 sent after the kill {recovered:.2f}s after it; longest "
          f"time without a 202 {gap:.2f}s; 503s from first to last {span:.2f}s; {counts}; the restarted "
          f"node caught up {caught_up:.2f}s after the senders stopped; drains meanwhile stored "
          f"{drainer.stored}, {len(drainer.failures)} failed: {drainer.failures[:3]}")  # fmt: skip
    acked = [i for s in senders for i in s.acked]
    assert not [i for s in senders for i in s.unacked], "a batch was never accepted"
    assert len(acked) == len(set(acked)) > 1000
    drained = run_drain(cluster_stream.url, database_url, catalog)
    # A 503'd publish may have been stored all the same: its retry is then a duplicate, dropped by id.
    print(f"last drain: {drained.events} events, {drained.stored} stored, {drained.duplicates} duplicates")
    stored = dict(query(database_url, "SELECT id, count(*) FROM usage_events GROUP BY id"))
    missing = [i for i in acked if i not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert set(stored) == set(acked)  # every batch was retried until accepted: nothing else was sent
    # Counted once: the per-minute aggregates add up to one call per stored event.
    calls_counted = "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug = 'api_calls'"
    assert scalar(database_url, calls_counted) == len(acked)
    assert gap < 20, f"the gateway accepted nothing for {gap:.1f}s"


def test_the_whole_cluster_started_again_on_new_ports_keeps_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As `meter up --nats-cluster 3` does after a stop: same names and stores, ports picked anew."""
    monkeypatch.setenv("METER_STREAM_REPLICAS", "3")
    cluster = start_nats_cluster(tmp_path / "nats-cluster")
    try:
        prepare_stream(cluster.url)
        for i in range(10):
            js_call(
                cluster.url,
                lambda js, i=i: js.publish("meter.events.api_call", b"{}", headers={"Nats-Msg-Id": str(i)}),
            )
    finally:
        cluster.stop()
    again = start_nats_cluster(tmp_path / "nats-cluster")
    try:
        assert set(again.urls).isdisjoint(cluster.urls)
        # The meta leader is there; the stream's own leader follows: prepare_stream waits for it.
        prepare_stream(again.url, timeout=60)
        info = stream_info(again.url)
        assert info.config.num_replicas == 3 and info.state.messages == 10
        wait_caught_up(again.url, "n1")
    finally:
        again.stop()


def test_three_replicas_on_a_single_server_is_a_clear_error(nats_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METER_STREAM_REPLICAS", "3")
    with pytest.raises(RuntimeError, match="needs a NATS cluster of at least 3 nodes"):
        prepare_stream(nats_server.url, timeout=5)
