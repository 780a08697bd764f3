"""Sending the demo's traffic through the platform's SDK: requests in flight at once, optionally paced.

Each planned request is one ``AsyncMeterClient.send``: the SDK retries a 503, a 429 or a connection
error with the same body and ids (so a retry is counted once), honouring ``Retry-After``, and raises a
typed error for a refusal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
from tqdm import tqdm

from meter_platform.cli.demo.expectation import Expectation
from meter_platform.cli.demo.traffic import Traffic, encode_events
from meter_platform.sdk import ApiError, AsyncMeterClient, DeliveryError, RetryPolicy

#: Requests in flight at once: enough to keep the gateway's JetStream publishes (each an fsync) busy.
CONCURRENCY = 8
#: How long one request is retried (503, 429, connection errors) before the demo gives up.
RETRY_BUDGET = 60.0
#: Decimals stay Decimals: the SDK sends them with exactly the digits the expectation summed.
_decoder = msgspec.json.Decoder(float_hook=Decimal)


class DemoError(Exception):
    """The demo cannot go on (the gateway refused a request, or stays unreachable)."""


def demo_client(gateway_url: str, api_key: str | None, concurrency: int = CONCURRENCY) -> AsyncMeterClient:
    """The SDK client the demo sends with: ``concurrency`` connections, the demo's retry budget."""
    return AsyncMeterClient(
        gateway_url, api_key, concurrency=concurrency, timeout=60.0, retry=RetryPolicy(budget=RETRY_BUDGET)
    )


class TokenBucket:
    """Paces requests to ``rate`` events per second; bursts up to ``capacity`` events."""

    def __init__(self, rate: float, capacity: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` events may go out."""
        async with self._lock:  # first come, first served: a big request is not starved by small ones
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass
class SendStats:
    """What sending did."""

    requests: int = 0  # HTTP requests, retries included
    retries: int = 0
    accepted: int = 0  # events in 202 answers, re-sends included
    resent: int = 0  # events in re-send requests
    elapsed: float = 0.0


async def _post(
    client: AsyncMeterClient,
    events: Sequence[dict[str, Any]],
    encode: Callable[[Sequence[dict[str, Any]]], bytes],
) -> None:
    """Send one request's events through the SDK (it retries); a refusal or a give-up is a DemoError.

    With the traffic's own encoder the events go as they are (the SDK encodes them the same way:
    Decimals as numbers with their digits); any other ``encode`` decides what is sent.
    """
    wire = events if encode is encode_events else _decoder.decode(encode(events))
    try:
        await client.send(wire)
    except ApiError as exc:
        # A 4xx means the demo sent something the contract refuses: a bug to fix, not to retry.
        raise DemoError(f"POST /v1/events answered {exc.status}: {exc.error} {exc.details}") from exc
    except DeliveryError as exc:
        raise DemoError(f"the gateway stays unreachable or busy ({exc})") from exc


async def send_traffic(
    client: AsyncMeterClient,
    traffic: Traffic,
    expectation: Expectation,
    rate: float | None = None,
    concurrency: int = CONCURRENCY,
    progress: tqdm | None = None,
    encode: Callable[[Sequence[dict[str, Any]]], bytes] = encode_events,
) -> SendStats:
    """Send every planned request, ``concurrency`` at a time, and feed accepted events to ``expectation``.

    ``encode`` makes each request's JSON (the SDK sends exactly those events, Decimals with their
    digits). ``meter demo`` passes the package's ``demo.encode_events``, looked up when it runs, so
    replacing that one name changes what is sent (a test sends events the gateway refuses that way).
    Raises DemoError (after cancelling the requests in flight) when a request is refused.
    """
    stats = SendStats()
    # A burst of one request at most: the rate holds from the first second on.
    bucket = TokenBucket(rate, max(s.count for s in traffic.plan)) if rate else None
    done = {spec.index: asyncio.Event() for spec in traffic.plan}
    specs = iter(traffic.plan)
    before = (client.stats.requests, client.stats.retries)

    async def worker() -> None:
        for spec in specs:  # shared iterator: each request is taken by exactly one worker, in plan order
            if spec.resend_of is not None:
                # A re-send copies a request the gateway has accepted: wait for that 202.
                await done[spec.resend_of].wait()
            if bucket is not None:
                await bucket.take(spec.count)
            events = traffic.events_for(spec)
            await _post(client, events, encode)
            expectation.add(events)
            stats.accepted += len(events)
            if spec.resend_of is not None:
                stats.resent += len(events)
            done[spec.index].set()
            if progress is not None:
                progress.update(len(events))

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(traffic.plan))):
                group.create_task(worker())
    except* DemoError as errors:
        raise errors.exceptions[0] from None
    finally:
        stats.elapsed = time.monotonic() - started
        stats.requests = client.stats.requests - before[0]
        stats.retries = client.stats.retries - before[1]
    return stats
