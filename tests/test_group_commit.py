"""Group commit: small concurrent requests share JetStream messages, each answered only after its
message's ack, each event keeping its own request's receive time; a failed message fails exactly the
requests in it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ingest_gateway.group_commit import GroupCommitter
from meter_platform.capture.envelope import Event, decode_batch, receive_times
from meter_platform.capture.messages import EventRows, Message, Rejected, decode_message
from meter_platform.config import BATCH_HEADER
from tests.helpers import RECENT_TS, api_call, backlog, query, run_drain


def _event(i: int) -> Event:
    return Event(event_type="api_call", customer_id="c", id=f"g{i}", timestamp=RECENT_TS)


async def _send_concurrently(url: str, key: str, n: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/v1/events", json=api_call(f"gc-{i}", customer=f"c{i % 7}")) for i in range(n))
        )


def test_concurrent_single_event_requests_share_messages_and_each_is_stored_once(
    gateway_url, admin_key, nats_server, database_url, catalog
):
    answers = asyncio.run(_send_concurrently(gateway_url, admin_key, 300))
    assert [a.status_code for a in answers] == [202] * 300
    assert sorted(a.json()["ids"][0] for a in answers) == sorted(f"gc-{i}" for i in range(300))
    messages = backlog(nats_server.url).last_seq
    assert messages < 300, "300 concurrent requests should not need 300 messages"

    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.messages, counts.events, counts.stored, counts.duplicates) == (messages, 300, 300, 0)
    # Within a shared message, each event kept its own request's receive time.
    shared = query(
        database_url,
        "SELECT stream_seq, count(*), count(DISTINCT received_at) FROM usage_events"
        " GROUP BY stream_seq HAVING count(*) > 1",
    )
    assert shared, "no message held more than one request"
    assert any(distinct > 1 for _, _, distinct in shared)


def test_a_message_holding_several_requests_is_read_with_each_requests_receive_time():
    from meter_platform.capture.envelope import GatewayBatch, encode_batch

    batch = GatewayBatch(
        received_at=1_000, events=[_event(1), _event(2), _event(3)], spans=[(1, 1_000), (2, 2_000)]
    )
    data = encode_batch(batch)
    assert receive_times(decode_batch(data)) == [(1, 1_000), (2, 2_000)]
    rows, bad = EventRows(), list[Rejected]()
    decode_message(
        Message(seq=9, subject="s", data=data, headers={BATCH_HEADER: "1"}, timestamp_us=5), rows, bad, {}
    )
    assert rows.ids == ["g1", "g2", "g3"] and not bad
    assert [int(r.timestamp() * 1_000_000) for r in rows.received] == [1_000, 2_000, 2_000]
    # A message of one request (no spans), as before group commit: the batch's receive time.
    single = encode_batch(GatewayBatch(received_at=7_000, events=[_event(4)]))
    assert b"spans" not in single
    assert receive_times(decode_batch(single)) == [(1, 7_000)]


def test_a_failed_message_fails_exactly_its_requests():
    """With one message in flight, requests arriving meanwhile share the next one; that one fails (as a
    full stream would refuse it): its requests get the error, the first request's success stands."""
    published: list[bytes] = []
    release = asyncio.Event()

    async def publish(payload: bytes) -> None:
        published.append(payload)
        if len(published) == 1:
            await release.wait()  # the first message awaits its ack while others arrive
            return
        raise RuntimeError("stream full")

    async def scenario() -> list[BaseException | None]:
        group = GroupCommitter(publish, max_bytes=1 << 20, max_in_flight=1)
        first = asyncio.ensure_future(group.submit([_event(0)], 1))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(group.submit([_event(i)], 1 + i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(first, *later, return_exceptions=True)
        assert group.messages == 1 and group.requests == 4
        return list(outcomes)

    outcomes = asyncio.run(scenario())
    assert outcomes[0] is None
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:])
    assert len(published) == 2  # the three later requests went out together
    assert [e.id for e in decode_batch(published[1]).events] == ["g1", "g2", "g3"]


def test_a_group_larger_than_the_max_payload_is_split_between_requests():
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)
        await asyncio.sleep(0.01)

    async def scenario() -> None:
        group = GroupCommitter(publish, max_bytes=400, max_in_flight=1)
        await asyncio.gather(*(group.submit([_event(i)], i) for i in range(8)))

    asyncio.run(scenario())
    ids = [e.id for p in published for e in decode_batch(p).events]
    assert sorted(ids) == sorted(f"g{i}" for i in range(8))  # each exactly once
    assert all(len(p) <= 400 for p in published)


@pytest.mark.parametrize("in_flight", [0, 2])
def test_a_request_alone_is_published_at_once_in_its_own_message(
    in_flight, settings, catalog, clean, nats_server, admin_key
):
    """Sequential requests never wait for company: each goes out at once (group commit on or off)."""
    import dataclasses

    from starlette.testclient import TestClient

    from ingest_gateway.app import create_app

    app = create_app(dataclasses.replace(settings, group_commit_in_flight=in_flight), catalog)
    with TestClient(app, headers={"Authorization": f"Bearer {admin_key}"}) as client:
        for i in range(5):
            response = client.post("/v1/events", json=api_call(f"alone-{in_flight}-{i}"))
            assert response.status_code == 202, response.text
        assert (client.app.state.gateway.group is None) == (in_flight == 0)
    assert backlog(nats_server.url).last_seq == 5
