"""Partitions (METER_PARTITIONS): the stable split by customer, one consumer per partition, the gateway
publishing each part on its partition's subject, N drainers at once, and changing N with messages
waiting — every event stored exactly once, against the real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from nats.js.api import StreamInfo
from starlette.testclient import TestClient

from ingest_gateway.app import create_app
from ingest_gateway.webhooks import UNMAPPED_SUBJECT
from meter_platform.capture import jetstream
from meter_platform.capture.envelope import Event, GatewayBatch, encode_batch, now_us
from meter_platform.capture.partitions import (
    UNPARTITIONED_SUBJECTS,
    consumer_name,
    filter_subjects,
    gateway_subject,
    layout,
    partition_of,
    split,
)
from meter_platform.catalog import Catalog
from meter_platform.config import (
    BATCH_HEADER,
    GATEWAY_SUBJECT,
    MAX_PARTITIONS,
    STREAM_NAME,
    DrainSettings,
)
from meter_platform.ingestion.counts import BatchCounts
from meter_platform.ingestion.drain import drain
from tests.helpers import AUTH, api_call, limit_stream, publish, query, scalar, serve

SMALL = DrainSettings(batch_size=3, fetch_timeout=0.3, max_seconds=90, idle_seconds=0.8)


# --- the layout, pure -------------------------------------------------------------------------------


def test_the_hash_is_stable_and_spreads_customers_over_every_partition():
    # crc32 of the UTF-8 id: the same in every process and release (not Python's salted hash()).
    assert partition_of("acme", 4) == zlib.crc32(b"acme") % 4
    assert partition_of("société-générale", 16) == zlib.crc32("société-générale".encode()) % 16
    assert partition_of("anyone", 1) == 0
    for n in (2, 3, 4, 16):
        spread = Counter(partition_of(f"customer-{i}", n) for i in range(4000))
        assert set(spread) == set(range(n))
        assert min(spread.values()) > 0.8 * 4000 / n, spread  # about even


@pytest.mark.parametrize("n", range(1, MAX_PARTITIONS + 1))
def test_every_layout_has_disjoint_filters_covering_every_subject(n):
    consumers = layout(n)  # raises on an overlap or a gap
    assert list(consumers) == [consumer_name(p, n) for p in range(n)]
    if n == 1:
        assert consumers == {"meter-ingest": []}  # exactly today: one unfiltered consumer
        assert gateway_subject(0, 1) == GATEWAY_SUBJECT
        return
    subjects = [s for p in range(n) for s in filter_subjects(p, n)]
    assert len(subjects) == len(set(subjects)) == MAX_PARTITIONS + len(UNPARTITIONED_SUBJECTS)
    # p0 takes the direct path, N=1's leftovers and the unmapped webhooks; each p<k> of any N has an owner.
    assert {f"{jetstream.STREAM_SUBJECTS[0]}", GATEWAY_SUBJECT, UNMAPPED_SUBJECT} <= set(
        filter_subjects(0, n)
    )
    for p in range(n):
        assert gateway_subject(p, n) in filter_subjects(p, n)


def test_split_keeps_order_within_a_partition():
    items = [(f"e{i}", f"c{i % 7}") for i in range(50)]
    parts = split(items, lambda item: item[1], 4)
    assert sorted(e for _, part in parts for e in part) == sorted(items)
    for p, part in parts:
        assert all(partition_of(c, 4) == p for _, c in part)
        assert part == [item for item in items if partition_of(item[1], 4) == p]
    assert split(items, lambda item: item[1], 1) == [(0, items)]


# --- helpers against the servers --------------------------------------------------------------------


async def _js_call(url: str, call):
    nc = await jetstream.connect(url, name="tests-partitions")
    try:
        return await call(nc.jetstream())
    finally:
        await nc.close()


def apply_layout(url: str, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """What `meter up` does at start with METER_PARTITIONS=n."""
    monkeypatch.setenv("METER_PARTITIONS", str(n))
    asyncio.run(_js_call(url, lambda js: jetstream.ensure_stream_and_consumer(js, apply_limits=True)))


def consumers(url: str) -> dict[str, list[str]]:
    async def read(js):
        return {c.name: sorted(c.config.filter_subjects or []) for c in await js.consumers_info(STREAM_NAME)}

    return asyncio.run(_js_call(url, read))


def stream_info(url: str) -> StreamInfo:
    return asyncio.run(_js_call(url, lambda js: js.stream_info(STREAM_NAME)))


def publish_gateway_batch(url: str, subject: str, events: list[dict[str, Any]]) -> None:
    """A gateway message on ``subject`` (as a gateway with some N would have published it)."""
    batch = GatewayBatch(received_at=now_us(), events=[Event(**e) for e in events])

    async def send(js):
        await js.publish(subject, encode_batch(batch), stream=STREAM_NAME, headers={BATCH_HEADER: "1"})

    asyncio.run(_js_call(url, send))


def drain_partitions(
    url: str, database_url: str, catalog: Catalog, partitions: list[int], per_partition: int = 1
) -> list[BatchCounts]:
    """``per_partition`` drains of each partition, all at once (threads, each its own event loop)."""
    results: list[BatchCounts] = []
    errors: list[BaseException] = []

    def run(p: int) -> None:
        try:
            results.append(asyncio.run(drain(url, database_url, catalog, SMALL, partition=p)))
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in partitions for _ in range(per_partition)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a drainer hangs (deadlock?)"
    return results


def assert_exact(database_url: str, expected_ids: set[str]) -> None:
    """Each event stored once, the ledger balanced, the aggregates equal to a recount from raw events."""
    stored = [r[0] for r in query(database_url, "SELECT id FROM usage_events")]
    assert len(stored) == len(set(stored)) and set(stored) == expected_ids
    events, accounted = query(
        database_url,
        "SELECT coalesce(sum(events), 0), coalesce(sum(stored + duplicates + quarantined), 0) FROM ingest_messages",
    )[0]
    assert events == accounted
    assert scalar(database_url, "SELECT count(*) FROM quarantined_events") == 0
    recount = query(
        database_url,
        "SELECT customer_id, date_trunc('minute', ts), count(*) FROM usage_events"
        " WHERE event_type = 'api_call' GROUP BY 1, 2 ORDER BY 1, 2",
    )
    aggregates = query(
        database_url,
        "SELECT customer_id, minute, sum(event_count) FROM usage_minute_aggregates"
        " WHERE meter_slug = 'api_calls' GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert [(c, m, int(n)) for c, m, n in aggregates] == [(c, m, int(n)) for c, m, n in recount]


# --- changing N -------------------------------------------------------------------------------------


def test_changing_the_partitions_with_messages_waiting_stores_every_event_once(
    nats_server, database_url, catalog, clean, monkeypatch
):
    """1 -> 4 -> 2 -> 1, messages of the previous layout waiting at each change (some delivered and
    not acked): the reconciled consumers take them all, each event is stored exactly once."""
    url = nats_server.url
    ids: set[str] = set()

    def send(tag: str, n: int) -> None:
        for m in range(6):
            events = [api_call(f"{tag}-{m}-{i}", customer=f"cust-{(m * 5 + i) % 11}") for i in range(5)]
            ids.update(e["id"] for e in events)
            if n == 1:
                publish_gateway_batch(url, GATEWAY_SUBJECT, events)
            else:
                for p, part in split(events, lambda e: e["customer_id"], n):
                    publish_gateway_batch(url, gateway_subject(p, n), part)
        publish(url, api_call(f"{tag}-direct"))  # the direct path, whatever N
        ids.add(f"{tag}-direct")

    apply_layout(url, monkeypatch, 1)
    send("one", 1)
    assert consumers(url) == {"meter-ingest": []}
    # Part of the backlog is delivered and committed, never acked (a run killed between the two):
    # after the change, the new consumers get it again and the ledger makes it a no-op.
    with pytest.raises(RuntimeError, match="simulated crash"):
        asyncio.run(drain(url, database_url, catalog, SMALL, crash_after_commit=True))

    apply_layout(url, monkeypatch, 4)
    assert set(consumers(url)) == {f"meter-ingest-p{p}" for p in range(4)}
    send("four", 4)
    # Only partitions 1 and 3 drain now; 0 and 2 keep their messages for the next layout.
    drain_partitions(url, database_url, catalog, [1, 3])

    apply_layout(url, monkeypatch, 2)
    assert set(consumers(url)) == {"meter-ingest-p0", "meter-ingest-p1"}
    send("two", 2)
    drain_partitions(url, database_url, catalog, [1])

    apply_layout(url, monkeypatch, 1)
    assert consumers(url) == {"meter-ingest": []}
    last = drain_partitions(url, database_url, catalog, [0])
    assert stream_info(url).state.messages == 0, "every message taken and acked"
    assert_exact(database_url, ids)
    assert last[0].redelivered == 3, "the committed, un-acked batch came again and was skipped"


def test_without_apply_limits_missing_consumers_are_created_and_nothing_deleted(
    nats_server, database_url, catalog, clean, monkeypatch
):
    """Every process but `meter up` only adds what is missing: a layout for another N on the server
    stays (with a warning) until `meter up` applies the change; the drain says so."""
    url = nats_server.url
    apply_layout(url, monkeypatch, 2)
    monkeypatch.setenv("METER_PARTITIONS", "4")
    asyncio.run(_js_call(url, jetstream.ensure_stream_and_consumer))
    # p2 and p3 of 4 overlap p0 and p1 of 2 (which own the even and odd p<k>): refused, left for
    # `meter up`; nothing of the layout for 2 is deleted.
    assert {"meter-ingest-p0", "meter-ingest-p1"} <= set(consumers(url))
    with pytest.raises(RuntimeError, match="meter up"):
        asyncio.run(drain(url, database_url, catalog, SMALL, partition=3))


# --- N drainers at once -----------------------------------------------------------------------------


def send_partitioned(url: str, n: int, messages: int, customers: int, tag: str) -> set[str]:
    """``messages`` requests as a gateway with N partitions publishes them (each split by customer),
    plus a direct publish per request carrying customers of every partition (all to p0): the same
    customers and minutes everywhere, so drainers of different partitions upsert the same rows too."""
    ids: set[str] = set()

    async def send(js) -> None:
        for m in range(messages):
            events = [api_call(f"{tag}-{m}-{i}", customer=f"cust-{(m + i) % customers}") for i in range(20)]
            ids.update(e["id"] for e in events)
            for p, part in split(events, lambda e: e["customer_id"], n):
                batch = GatewayBatch(received_at=now_us(), events=[Event(**e) for e in part])
                await js.publish(gateway_subject(p, n), encode_batch(batch), headers={BATCH_HEADER: "1"})
            direct = [
                api_call(f"{tag}-{m}-d{i}", customer=f"cust-{(m * 3 + i) % customers}") for i in range(3)
            ]
            ids.update(e["id"] for e in direct)
            await js.publish("meter.events.api_call", msgspec.json.encode(direct))

    asyncio.run(_js_call(url, send))
    return ids


@pytest.mark.parametrize("n", [2, 4])
def test_n_drainers_each_on_its_own_consumer_count_everything_once(
    nats_server, database_url, catalog, clean, monkeypatch, n
):
    url = nats_server.url
    apply_layout(url, monkeypatch, n)
    ids = send_partitioned(url, n, messages=60, customers=24, tag=f"n{n}")
    per = asyncio.run(_js_call(url, jetstream.backlog)).partitions
    assert [p.consumer for p in per] == [f"meter-ingest-p{p}" for p in range(n)]
    assert all(p.pending > 0 for p in per), "every partition has its share"

    results = drain_partitions(url, database_url, catalog, list(range(n)))
    assert len(results) == n and all(r.batches > 0 for r in results), "every drainer drained"
    assert sum(r.events for r in results) == len(ids) and sum(r.stored for r in results) == len(ids)
    assert stream_info(url).state.messages == 0
    assert_exact(database_url, ids)


@pytest.mark.parametrize("n", [1, 2])
def test_two_runs_on_each_partitions_consumer_count_everything_once(
    nats_server, database_url, catalog, clean, monkeypatch, n
):
    """The sensor's busy runs beside the warm one: two drains per consumer, N consumers, all at once."""
    url = nats_server.url
    apply_layout(url, monkeypatch, n)
    ids = send_partitioned(url, n, messages=40, customers=6, tag=f"two{n}")
    results = drain_partitions(url, database_url, catalog, list(range(n)), per_partition=2)
    assert len(results) == 2 * n
    assert sum(r.stored for r in results) == len(ids) and sum(r.duplicates for r in results) == 0
    assert_exact(database_url, ids)


def test_a_direct_publish_still_lands_with_four_partitions(
    nats_server, database_url, catalog, clean, monkeypatch
):
    url = nats_server.url
    apply_layout(url, monkeypatch, 4)
    customers = [f"direct-{i}" for i in range(8)]
    assert len({partition_of(c, 4) for c in customers}) > 1
    for i, customer in enumerate(customers):
        publish(url, api_call(f"direct-{i}", customer=customer))  # meter.events.api_call: consumer p0's
    per = asyncio.run(_js_call(url, jetstream.backlog)).partitions
    assert [p.pending for p in per] == [8, 0, 0, 0]
    drain_partitions(url, database_url, catalog, [0])
    assert_exact(database_url, {f"direct-{i}" for i in range(8)})


def test_backlog_and_oldest_pending_cover_every_partition(
    nats_server, database_url, catalog, clean, monkeypatch
):
    url = nats_server.url
    apply_layout(url, monkeypatch, 4)
    publish_gateway_batch(url, gateway_subject(3, 4), [api_call("old-3", customer="x")])
    publish_gateway_batch(url, gateway_subject(1, 4), [api_call("new-1", customer="y")])
    total = asyncio.run(_js_call(url, jetstream.backlog))
    assert (total.pending, total.ack_pending, total.messages) == (2, 0, 2)
    assert [p.pending for p in total.partitions] == [0, 1, 0, 1]
    oldest = asyncio.run(_js_call(url, jetstream.oldest_pending))
    stored = asyncio.run(_js_call(url, lambda js: js.get_msg(STREAM_NAME, seq=1)))
    assert oldest is not None and oldest == stored.time
    drain_partitions(url, database_url, catalog, [3])  # the oldest goes: the next one is p1's
    oldest = asyncio.run(_js_call(url, jetstream.oldest_pending))
    assert oldest == asyncio.run(_js_call(url, lambda js: js.get_msg(STREAM_NAME, seq=2))).time
    drain_partitions(url, database_url, catalog, [1])
    assert asyncio.run(_js_call(url, jetstream.oldest_pending)) is None


# --- the gateway with four partitions ---------------------------------------------------------------


@pytest.fixture
def gateway4(nats_server, settings, catalog, clean, monkeypatch) -> Iterator[TestClient]:
    """The gateway with METER_PARTITIONS=4, its consumers laid out as `meter up` does."""
    apply_layout(nats_server.url, monkeypatch, 4)
    with TestClient(create_app(settings, catalog), raise_server_exceptions=False, headers=AUTH) as client:
        yield client


def subjects(url: str) -> dict[str, int]:
    async def read(js):
        return (await js.stream_info(STREAM_NAME, subjects_filter=">")).state.subjects or {}

    return asyncio.run(_js_call(url, read))


def test_a_request_lands_on_each_of_its_customers_partitions_and_is_answered_once_all_are_durable(
    gateway4, nats_server, database_url, catalog
):
    customers = [f"gw-{i}" for i in range(12)]
    wanted = {partition_of(c, 4) for c in customers}
    assert len(wanted) >= 3
    big = [api_call(f"big-{i}", customer=customers[i % 12]) for i in range(60)]  # alone, per partition
    small = [api_call(f"small-{i}", customer=customers[i]) for i in range(4)]  # group commit, per partition
    for body in (big, small):
        response = gateway4.post("/v1/events", json=body)
        assert response.status_code == 202, response.text
    # Answered: every part is in the stream already, each on its partition's subject.
    expected = Counter(gateway_subject(partition_of(e["customer_id"], 4), 4) for e in big)
    landed = subjects(nats_server.url)
    assert set(landed) == set(expected) | {
        gateway_subject(partition_of(e["customer_id"], 4), 4) for e in small
    }
    assert "meter.gateway.batch" not in landed
    results = drain_partitions(nats_server.url, database_url, catalog, list(range(4)))
    assert sum(r.stored for r in results) == 64
    for r in results:  # each drainer took only its own partition's customers
        assert r.messages == 0 or r.stored > 0
    by_partition = query(database_url, "SELECT customer_id, count(*) FROM usage_events GROUP BY 1")
    assert sum(n for _, n in by_partition) == 64
    assert_exact(database_url, {e["id"] for e in big + small})

    status = gateway4.get("/v1/ingest/status").json()
    assert status["consumer"]["pending"] == 0 and status["consumer"]["name"] == "meter-ingest-p*"
    assert [p["name"] for p in status["consumer"]["partitions"]] == [f"meter-ingest-p{p}" for p in range(4)]
    assert status["events"]["stored"] == 64 and status["events"]["balanced"]


def test_a_request_with_one_part_refused_gets_503_and_its_retry_is_exact(
    gateway4, nats_server, database_url, catalog
):
    """The stream has room for one message: one part of a three-partition request lands, the others
    are refused; the client gets the 503 with every id, retries with them once there is room, and
    each event is stored once (the landed part's copies counted as duplicates)."""
    customers = {}
    for i in range(100):
        customers.setdefault(partition_of(f"r-{i}", 4), f"r-{i}")
    body = [api_call(f"retry-{p}", customer=c) for p, c in sorted(customers.items())[:3]]
    limit_stream(nats_server.url, 1)
    response = gateway4.post("/v1/events", json=body)
    assert response.status_code == 503, response.text
    assert response.json()["details"][0]["ids"] == [e["id"] for e in body]
    assert stream_info(nats_server.url).state.messages == 1  # one part landed: harmless
    limit_stream(nats_server.url, -1)
    assert gateway4.post("/v1/events", json=body).status_code == 202
    results = drain_partitions(nats_server.url, database_url, catalog, list(range(4)))
    assert (sum(r.stored for r in results), sum(r.duplicates for r in results)) == (3, 1)
    assert_exact(database_url, {e["id"] for e in body})


# --- the sensor plans per partition -----------------------------------------------------------------


def test_the_sensor_keeps_a_warm_run_per_partition_and_adds_busy_runs_where_events_wait(
    nats_server, database_url, clean, monkeypatch
):
    from dagster import (
        DagsterInstance,
        DagsterRunStatus,
        Definitions,
        RunRequest,
        SkipReason,
        build_sensor_context,
    )

    from meter_platform import definitions
    from meter_platform.config import EXAMPLE_CATALOG_DIR
    from meter_platform.defs.ingestion import sensors
    from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
    from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource

    apply_layout(nats_server.url, monkeypatch, 2)
    instance = DagsterInstance.ephemeral()
    resources = {"nats": NatsResource(url=nats_server.url)}

    def evaluate(cursor: str | None = None):
        context = build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        return sensors.jetstream_backlog_sensor(context), context.cursor

    result, cursor = evaluate()
    assert isinstance(result, list) and len(result) == 2
    for p, request in enumerate(result):
        assert isinstance(request, RunRequest)
        assert request.tags[sensors.PARTITION_TAG] == str(p) and request.tags[sensors.WARM_TAG] == "true"
        assert request.tags["meter/pipeline"] == f"ingest-p{p}"  # dagster.yaml's limit, per partition
        assert request.run_config["ops"]["ingest_microbatches"]["config"]["partition"] == p

    job = Definitions(
        assets=definitions.defs.assets,
        jobs=[ingest_microbatch_job],
        resources={
            "nats": NatsResource(url=nats_server.url),
            "postgres": PostgresResource(url=database_url),
            "catalog": CatalogResource(catalog_dir=str(EXAMPLE_CATALOG_DIR)),
        },
    ).resolve_job_def(ingest_microbatch_job.name)
    for p in range(2):
        tags = {sensors.WARM_TAG: "true", sensors.BUDGET_TAG: "1800", sensors.PARTITION_TAG: str(p)}
        instance.create_run_for_job(job, status=DagsterRunStatus.STARTED, tags=tags)
    result, cursor = evaluate(cursor)
    assert isinstance(result, SkipReason) and "p0: no events waiting" in (result.skip_message or "")

    # A deep backlog on partition 1 only: a busy run there, none for partition 0.
    monkeypatch.setenv("METER_SCALE_OUT_BACKLOG", "5")
    for m in range(6):
        publish_gateway_batch(nats_server.url, gateway_subject(1, 2), [api_call(f"deep-{m}", customer="z")])
    result, cursor = evaluate(cursor)
    assert isinstance(result, list) and len(result) == 1
    assert result[0].tags[sensors.PARTITION_TAG] == "1" and sensors.WARM_TAG not in result[0].tags
    assert result[0].run_config["ops"]["ingest_microbatches"]["config"] == {"partition": 1}


def test_metrics_sum_the_partitions_consumers(gateway4, nats_server):
    publish_gateway_batch(nats_server.url, gateway_subject(3, 4), [api_call("m-3", customer="x")])
    publish_gateway_batch(nats_server.url, gateway_subject(1, 4), [api_call("m-1", customer="y")])
    publish(nats_server.url, api_call("m-direct"))
    text = gateway4.get("/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("meter_jetstream_consumer_", "meter_pipeline_oldest_waiting_seconds"))
    }
    assert values["meter_jetstream_consumer_pending"] == 3
    assert values["meter_jetstream_consumer_ack_floor"] == 0
    assert values["meter_pipeline_oldest_waiting_seconds"] > 0  # the p3 message's age, read by subject


def test_small_requests_are_merged_per_partition(
    nats_server, settings, catalog, clean, database_url, monkeypatch
):
    """Group commit with four partitions: 200 concurrent single-event requests share messages, each
    message holds the events of one partition only, each request answered once its part is acked."""
    apply_layout(nats_server.url, monkeypatch, 4)

    async def send(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/events", json=api_call(f"gc4-{i}", customer=f"c{i % 13}"))
                    for i in range(200)
                )
            )

    with serve(create_app(settings, catalog)) as url:
        answers = asyncio.run(send(url))
    assert [a.status_code for a in answers] == [202] * 200
    landed = subjects(nats_server.url)
    assert set(landed) == {gateway_subject(p, 4) for p in {partition_of(f"c{i}", 4) for i in range(13)}}
    assert sum(landed.values()) < 200, "concurrent small requests should share messages"
    drain_partitions(nats_server.url, database_url, catalog, list(range(4)))
    assert_exact(database_url, {f"gc4-{i}" for i in range(200)})
    # Every stored event came in a message of its own customer's partition.
    rows = query(
        database_url,
        "SELECT DISTINCT e.customer_id, m.subject FROM usage_events e JOIN ingest_messages m"
        " ON m.stream_seq = e.stream_seq",
    )
    assert rows and all(subject == gateway_subject(partition_of(c, 4), 4) for c, subject in rows)


def test_a_part_too_big_for_one_message_is_published_in_halves():
    """With partitions, parts of large requests go through group commit: one bigger than a message
    is halved until each piece fits, and answered once every piece is acked."""
    from ingest_gateway.group_commit import GroupCommitter
    from meter_platform.capture.envelope import decode_batch

    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)
        await asyncio.sleep(0.01)

    async def scenario() -> None:
        group = GroupCommitter(publish, max_bytes=400, max_in_flight=1)
        events = [Event(event_type="api_call", customer_id="c", id=f"h{i}") for i in range(9)]
        await group.submit(events, 1)
        assert group.messages == 1 and group.requests == 1

    asyncio.run(scenario())
    ids = [e.id for p in published for e in decode_batch(p).events]
    assert sorted(ids) == sorted(f"h{i}" for i in range(9)) and len(published) > 1
    assert all(len(p) <= 400 for p in published)


@pytest.mark.parametrize(("partitions", "override", "limit"), [(1, None, 6), (4, None, 12), (4, "20", 20)])
def test_the_dagster_instance_of_meter_up_allows_two_ingest_runs_per_partition(
    pg_server, monkeypatch, partitions, override, limit
):
    """dagster_home/dagster.yaml, loaded as the daemon loads it with the environment `meter up` gives
    it: the overall run limit grows with the partitions, so every partition's runs can be dequeued."""
    from dagster import DagsterInstance
    from dagster._core.run_coordinator import QueuedRunCoordinator

    from meter_platform.runtime.up import dagster_home, max_concurrent_runs
    from meter_platform.storage import db

    monkeypatch.setenv("METER_PARTITIONS", str(partitions))
    if override is None:
        monkeypatch.delenv("METER_MAX_CONCURRENT_RUNS", raising=False)
    else:
        monkeypatch.setenv("METER_MAX_CONCURRENT_RUNS", override)
    dagster_url = db.with_database(pg_server.url, "dagster_limits")
    db.ensure_database(dagster_url)
    monkeypatch.setenv("METER_DAGSTER_DATABASE_URL", dagster_url)
    monkeypatch.setenv("METER_MAX_CONCURRENT_RUNS", max_concurrent_runs())
    with DagsterInstance.from_config(str(dagster_home())) as instance:
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, QueuedRunCoordinator)
        queue = coordinator.get_run_queue_config()
        assert queue.max_concurrent_runs == limit
