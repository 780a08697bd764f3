"""Group commit: small requests that arrive together share one JetStream message (one fsync).

JetStream fsyncs every message before its ack, so a message costs about the same whatever it holds:
one publisher does ~5k single-event messages/s but ~290k events/s in messages of 100. When requests
of a few events each arrive faster than JetStream acks them, the gateway gathers them:

- while fewer than ``max_in_flight`` group messages await their ack, a request is published at once
  (no added latency when the gateway is not busy);
- otherwise it waits for the next free slot, and every request that arrived meanwhile goes out in
  that one message (up to ``max_events`` events and the server's max payload);
- each request is answered only after the PubAck of the message that holds its events. A failed
  publish fails exactly the requests in that message (the caller answers them 503 with their ids);
  none of them is half-stored, for a message is stored whole or not at all.

Each event keeps its own request's receive time (``GatewayBatch.spans``).

With ``METER_PARTITIONS`` above 1 the gateway keeps one committer per partition (each publishing on
its partition's subject) and submits each request's part to its partition's: requests are merged per
partition, and a request is answered once every one of its parts is acked. There every part of up to
``max_events`` goes through its committer, not only small ones: splitting a request of 100 events over
4 partitions makes 4 messages of 25, and merging the parts of concurrent requests gives the message
count back. A single request too big for one message is published in halves (answered once all are
acked), as the gateway splits a large request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meter_platform.capture.envelope import Event, GatewayBatch, encode_batch


@dataclass
class _Request:
    events: list[Event]
    received_us: int
    done: asyncio.Future[None]


@dataclass
class GroupCommitter:
    """Gathers small requests into shared messages; ``publish(payload)`` publishes one and awaits its ack."""

    publish: Callable[[bytes], Awaitable[object]]
    max_bytes: int
    max_in_flight: int = 2
    max_events: int = 1000
    _waiting: deque[_Request] = field(default_factory=deque)
    _in_flight: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    messages: int = 0  # group messages published (the bench reports requests per message)
    requests: int = 0

    async def submit(self, events: list[Event], received_us: int) -> None:
        """Publish ``events`` in a shared message; return once it is acked, raise what its publish raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Read the outcome even when the client went away meanwhile (no "never retrieved" warning).
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append(_Request(events, received_us, done))
        self.requests += 1
        self._pump()
        await asyncio.shield(done)  # a client that goes away does not cancel the others' message

    def _pump(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            group: list[_Request] = []
            total = 0
            while self._waiting and (not group or total + len(self._waiting[0].events) <= self.max_events):
                request = self._waiting.popleft()  # O(1): hundreds may wait under load
                group.append(request)
                total += len(request.events)
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(group))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[_Request]) -> None:
        try:
            for part in self._fitting(group):
                await self._send_one(part)
        finally:
            self._in_flight -= 1
            self._pump()

    def _fitting(self, group: list[_Request]) -> list[tuple[list[_Request], bytes]]:
        """The group as messages under ``max_bytes``, split between requests (never inside one)."""
        pending, out = [group], []
        while pending:
            part = pending.pop()
            payload = _encode(part)
            if len(payload) <= self.max_bytes or len(part) == 1:
                out.append((part, payload))
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
        return out

    async def _send_one(self, part: tuple[list[_Request], bytes]) -> None:
        requests, payload = part
        try:
            if len(payload) > self.max_bytes and len(requests) == 1 and len(requests[0].events) > 1:
                # One request too big for a message (a partition's part of a large request may come
                # here): in halves, as the gateway splits a large request; answered once all are acked.
                await asyncio.gather(*(self.publish(p) for p in _halves(requests[0], self.max_bytes)))
            else:
                await self.publish(payload)
        except Exception as exc:  # not durable: every request of this message is told, and only they
            for r in requests:
                if not r.done.done():
                    r.done.set_exception(exc)
            return
        self.messages += 1
        for r in requests:
            if not r.done.done():
                r.done.set_result(None)


def _encode(requests: list[_Request]) -> bytes:
    events = [e for r in requests for e in r.events]
    spans = [(len(r.events), r.received_us) for r in requests] if len(requests) > 1 else None
    return encode_batch(GatewayBatch(received_at=requests[0].received_us, events=events, spans=spans))


def _halves(request: _Request, max_bytes: int) -> list[bytes]:
    """One request's events as messages under ``max_bytes``, halving until they fit (or are single)."""
    pending, out = [request.events], []
    while pending:
        events = pending.pop()
        payload = encode_batch(GatewayBatch(received_at=request.received_us, events=events))
        if len(payload) <= max_bytes or len(events) == 1:
            out.append(payload)
        else:
            half = len(events) // 2
            pending += [events[half:], events[:half]]
    return out
