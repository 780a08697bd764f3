"""AsyncMeterClient against the real gateway: tracked and sent events stored once, typed reads and
errors, a full buffer refused after its timeout."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from meter_platform.runtime.servers import free_port
from meter_platform.sdk import (
    AsyncMeterClient,
    BufferFull,
    DeliveryError,
    IngestStatus,
    InvalidRequest,
    RetryPolicy,
    StoredEvent,
    Usage,
)
from tests.helpers import query, run_drain

PROPS = {"endpoint": "/v1/users", "method": "GET", "region": "us-east-1", "bytes_transferred": 100}


def test_async_client_tracks_sends_and_reads(gateway_url, admin_key, nats_server, database_url, catalog):
    async def produce() -> tuple[list[str], list[str], IngestStatus]:
        async with AsyncMeterClient(gateway_url, admin_key, batch_size=40, concurrency=3) as meter:
            tracked = await asyncio.gather(
                *(meter.track("api_call", f"async-{n % 4}", PROPS) for n in range(300))
            )
            sent = await meter.send(
                [{"event_type": "api_call", "customer_id": "async-0", "properties": PROPS}] * 10
            )
            with pytest.raises(InvalidRequest) as caught:
                future = datetime.now(UTC) + timedelta(days=1)
                await meter.send([{"event_type": "api_call", "customer_id": "c", "timestamp": future}])
            assert [i.field for i in caught.value.item_errors] == ["timestamp"]
            await meter.flush()
            return list(tracked), sent, await meter.status()

    tracked, sent, status = asyncio.run(produce())
    assert isinstance(status, IngestStatus) and status.stream.messages == 8 + 1  # 300 in batches of 40, + 1
    counts = run_drain(nats_server.url, database_url, catalog)
    assert (counts.stored, counts.duplicates) == (310, 0)
    assert {r[0] for r in query(database_url, "SELECT id FROM usage_events")} == set(tracked) | set(sent)

    async def read() -> tuple[Usage, StoredEvent | None, StoredEvent | None]:
        async with AsyncMeterClient(gateway_url, admin_key) as meter:
            usage = await meter.usage("api_calls", group_by="customer_id", window="day")
            return usage, await meter.event(tracked[0]), await meter.event("never")

    usage, event, missing = asyncio.run(read())
    assert usage.total == 310 and {r.customer_id for r in usage.data} == {f"async-{k}" for k in range(4)}
    assert event is not None and event.state == "stored" and event.customer_id == "async-0"
    assert missing is None


def test_async_buffer_full_raises_after_its_timeout_and_keeps_the_events(admin_key):
    async def run() -> None:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        meter = AsyncMeterClient(
            url, admin_key, max_buffer=3, track_timeout=0.2, retry=RetryPolicy(budget=0.3)
        )
        ids = [await meter.track("api_call", "c", PROPS) for _ in range(3)]
        started = time.monotonic()
        with pytest.raises(BufferFull):
            await meter.track("api_call", "c", PROPS)
        assert time.monotonic() - started >= 0.2
        with pytest.raises(DeliveryError):
            await meter.aclose()
        assert sorted(e["id"] for e in meter.pending()) == sorted(ids)

    asyncio.run(run())
