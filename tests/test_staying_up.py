"""What keeps the platform serving through the failures of a chaos run: a changed stream limit that
must take effect, zombie runs that must not hold ingestion back, a drain whose run is gone, a broker
that must be restarted. Real servers throughout (tests/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from meter_platform.capture import jetstream
from meter_platform.config import STREAM_NAME

pytestmark = pytest.mark.usefixtures("clean")


async def _ensure_and_read_limits(url: str, apply_limits: bool) -> tuple[int, int, int]:
    nc = await jetstream.connect(url, name="tests")
    try:
        js = nc.jetstream()
        await jetstream.ensure_stream_and_consumer(js, apply_limits=apply_limits)
        info = await js.stream_info(STREAM_NAME)
        return info.config.max_msgs, info.config.max_bytes, info.state.messages
    finally:
        await nc.close()


def test_changed_stream_limits_apply_to_the_existing_stream_at_start(nats_server, monkeypatch):
    from tests.helpers import api_call, publish

    publish(nats_server.url, [api_call("l1")])
    publish(nats_server.url, [api_call("l2")])
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (-1, -1, 2)
    monkeypatch.setenv("METER_STREAM_MAX_MSGS", "1")  # below what the stream holds
    monkeypatch.setenv("METER_STREAM_MAX_BYTES", str(64 * 1024 * 1024))
    # Any other process ensuring the stream leaves its limits alone (a limit tuned while running stays).
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, False)) == (-1, -1, 2)
    # The platform's start applies them; with discard=new nothing already accepted is dropped.
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (1, 64 * 1024 * 1024, 2)
    monkeypatch.delenv("METER_STREAM_MAX_MSGS")
    monkeypatch.delenv("METER_STREAM_MAX_BYTES")
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (-1, -1, 2)
