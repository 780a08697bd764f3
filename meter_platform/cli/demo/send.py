"""Sending the demo's traffic: requests in flight at once, optionally paced, retried after a 503.

A retry re-sends the same body, with the same event ids, so it is safe: the platform counts an id once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from meter_platform.cli.demo.expectation import Expectation
from meter_platform.cli.demo.traffic import Traffic, encode_events

#: Requests in flight at once: enough to keep the gateway's JetStream publishes (each an fsync) busy.
CONCURRENCY = 8
#: How often a request is retried after a 503 or a connection error before the demo gives up.
MAX_ATTEMPTS = 30


class DemoError(Exception):
    """The demo cannot go on (the gateway refused a request, or stays unreachable)."""


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


def retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


async def _post(client: httpx.AsyncClient, body: bytes, count: int, stats: SendStats) -> None:
    """POST one batch until it is accepted; retries reuse the same ids, so they are safe."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        stats.requests += 1
        try:
            response = await client.post(
                "/v1/events", content=body, headers={"content-type": "application/json"}
            )
        except httpx.TransportError as exc:
            if attempt == MAX_ATTEMPTS:
                raise DemoError(f"the gateway stays unreachable ({exc!r})") from exc
            stats.retries += 1
            await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
            continue
        if response.status_code == 202:
            accepted = response.json().get("accepted")
            if accepted != count:
                raise DemoError(f"the gateway accepted {accepted} of {count} events in one request")
            return
        if response.status_code in (502, 503, 504) and attempt < MAX_ATTEMPTS:
            stats.retries += 1
            await asyncio.sleep(retry_after(response))
            continue
        # A 4xx means the demo sent something the contract refuses: a bug to fix, not to retry.
        raise DemoError(f"POST /v1/events answered {response.status_code}: {response.text}")


async def send_traffic(
    client: httpx.AsyncClient,
    traffic: Traffic,
    expectation: Expectation,
    rate: float | None = None,
    concurrency: int = CONCURRENCY,
    progress: tqdm | None = None,
    encode: Callable[[Sequence[dict[str, Any]]], bytes] = encode_events,
) -> SendStats:
    """Send every planned request, ``concurrency`` at a time, and feed accepted events to ``expectation``.

    ``encode`` makes each request's body. ``meter demo`` passes the package's ``demo.encode_events``,
    looked up when it runs, so replacing that one name changes what is sent (a test sends bodies the
    gateway refuses that way). Raises DemoError (after cancelling the requests in flight) when a
    request is refused.
    """
    stats = SendStats()
    # A burst of one request at most: the rate holds from the first second on.
    bucket = TokenBucket(rate, max(s.count for s in traffic.plan)) if rate else None
    done = {spec.index: asyncio.Event() for spec in traffic.plan}
    specs = iter(traffic.plan)

    async def worker() -> None:
        for spec in specs:  # shared iterator: each request is taken by exactly one worker, in plan order
            if spec.resend_of is not None:
                # A re-send copies a request the gateway has accepted: wait for that 202.
                await done[spec.resend_of].wait()
            if bucket is not None:
                await bucket.take(spec.count)
            events = traffic.events_for(spec)
            await _post(client, encode(events), len(events), stats)
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
    return stats
