"""Small helpers shared by the tests: publish to JetStream, drain, read the database."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from meter_platform.capture import jetstream
from meter_platform.catalog import Catalog
from meter_platform.config import EVENTS_SUBJECT_PREFIX, DrainSettings
from meter_platform.ingestion.counts import BatchCounts
from meter_platform.ingestion.drain import drain
from meter_platform.storage import db

#: A recent event time (events older than the allowed lateness, 35 days, are quarantined).
RECENT = (datetime.now(UTC) - timedelta(days=1)).replace(second=45, microsecond=123456)
RECENT_TS = RECENT.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

FAST_DRAIN = DrainSettings(batch_size=200, fetch_timeout=0.3, max_seconds=30, idle_seconds=0.6)


def api_call(
    event_id: str | None,
    customer: str = "c1",
    *,
    ts: str | None = RECENT_TS,
    endpoint: str = "/v1/users",
    method: str = "GET",
    region: str = "us-east-1",
    bytes_transferred: Any = 2048,
) -> dict[str, Any]:
    """An api_call event as the contract shows it."""
    event: dict[str, Any] = {
        "event_type": "api_call",
        "customer_id": customer,
        "properties": {
            "endpoint": endpoint,
            "method": method,
            "region": region,
            "bytes_transferred": bytes_transferred,
        },
    }
    if event_id is not None:
        event["id"] = event_id
    if ts is not None:
        event["timestamp"] = ts
    return event


async def _publish(url: str, items: list[tuple[Any, dict[str, str] | None, str]]) -> None:
    nc = await jetstream.connect(url, name="tests-publisher")
    try:
        js = nc.jetstream()
        for payload, headers, subject in items:
            data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
            await js.publish(subject, data, headers=headers)
    finally:
        await nc.close()


def publish(url: str, payload: Any, *, msg_id: str | None = None, event_type: str = "api_call") -> None:
    """Publish one message straight to JetStream, as a service inside the network would."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    asyncio.run(_publish(url, [(payload, headers, f"{EVENTS_SUBJECT_PREFIX}.{event_type}")]))


def run_drain(nats_url: str, database_url: str, catalog: Catalog, **kwargs: Any) -> BatchCounts:
    """Drain the consumer until idle, as one job run would."""
    return asyncio.run(drain(nats_url, database_url, catalog, kwargs.pop("settings", FAST_DRAIN), **kwargs))


def query(database_url: str, sql: str, params: Any = None) -> list[tuple]:
    """Rows of a query."""
    with db.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def scalar(database_url: str, sql: str, params: Any = None) -> Any:
    """The single value of a query."""
    return query(database_url, sql, params)[0][0]


def backlog(nats_url: str) -> jetstream.Backlog:
    """Stream and consumer state."""

    async def read() -> jetstream.Backlog:
        nc = await jetstream.connect(nats_url, name="tests-backlog")
        try:
            return await jetstream.backlog(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(read())


#: The admin API key every test's gateway accepts (tests/conftest.py stores its hash); clients send AUTH.
ADMIN_KEY = "mk_live_tests-admin-key-0000000000000000000000000"
ADMIN_KEY_ID = "key_tests_admin"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@contextlib.contextmanager
def serve(app: Any, port: int | None = None, name: str = "gateway") -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a background thread (on ``port`` or a free one); its URL."""
    import uvicorn

    from meter_platform.runtime.servers import free_port

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"the {name} did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def limit_stream(url: str, max_msgs: int) -> None:
    """Set the events stream's message limit (-1: none); a full stream refuses publishes."""

    async def update() -> None:
        nc = await jetstream.connect(url, name="tests")
        try:
            config = jetstream.stream_config()
            config.max_msgs = max_msgs
            await nc.jetstream().update_stream(config)
        finally:
            await nc.close()

    asyncio.run(update())
