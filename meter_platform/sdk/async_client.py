"""``AsyncMeterClient``: the asyncio client. Same behaviour as MeterClient, with tasks for threads.

Use it from one event loop. Batches still in its buffer when the loop ends without ``aclose()`` are
sent at interpreter exit by a short-lived synchronous client (the same ids, so nothing doubles).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from meter_platform.sdk import core
from meter_platform.sdk.client import post_batch
from meter_platform.sdk.core import ClientCore, ErrorCallback
from meter_platform.sdk.errors import ApiError, BufferFull, DeliveryError, NotFound
from meter_platform.sdk.events import Encoded, batch_body, make_event, prepare_batch
from meter_platform.sdk.models import IngestStatus, Invoice, Meter, StoredEvent, Usage
from meter_platform.sdk.retry import (
    RETRY_EXCEPTIONS,
    RETRY_STATUSES,
    Attempts,
    RequestStats,
    RetryPolicy,
    outcome,
)

_JSON = {"Content-Type": "application/json"}


async def request_with_retry(
    http: httpx.AsyncClient,
    policy: RetryPolicy,
    method: str,
    path: str,
    ids: Sequence[str] = (),
    stats: RequestStats | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """The async twin of :func:`meter_platform.sdk.client.request_with_retry`."""
    attempts = Attempts(policy, list(ids), f"{method} {path}", stats)
    while True:
        attempts.attempt()
        try:
            response = await http.request(method, path, **kwargs)
        except RETRY_EXCEPTIONS as exc:
            await asyncio.sleep(attempts.next_delay(exc))
            continue
        error = outcome(response)
        if error is None:
            return response
        if error.status not in RETRY_STATUSES:
            raise error
        await asyncio.sleep(attempts.next_delay(error))


class AsyncMeterClient(ClientCore):
    """The asyncio client: ``await track(...)``, ``await send(...)``, ``await flush()``, ``await aclose()``.

    Settings and failure policy as :class:`~meter_platform.sdk.client.MeterClient`; ``concurrency``
    is the number of batches in flight at once (background tasks).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        max_buffer: int = 10_000,
        track_timeout: float | None = 5.0,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        concurrency: int = 1,
        on_error: ErrorCallback | None = None,
    ):
        super().__init__(
            base_url, api_key, batch_size, flush_interval, max_buffer, track_timeout, retry, on_error
        )
        limits = core.connection_limits(concurrency)
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers(), timeout=timeout, limits=limits
        )
        self._concurrency = concurrency
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._changed = asyncio.Event()
        # Batches being sent, so that a loop that ends under them does not lose them (see _close_at_exit).
        self._sending: dict[int, list[Encoded]] = {}
        self.buffer.on_change = self._signal
        core.register_for_exit(self)

    def _signal(self) -> None:
        """Wake every task waiting for a change of the buffer (a broadcast: a fresh Event each time)."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _wait_change(self, event: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # --- sending --------------------------------------------------------------------------------

    async def track(
        self,
        event_type: str,
        customer_id: str,
        properties: Mapping[str, Any] | None = None,
        id: str | None = None,
        timestamp: datetime | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue one event; its id. Waits up to ``track_timeout`` for room, then raises BufferFull."""
        self.check_open()
        event = make_event(event_type, customer_id, properties, id, timestamp, metadata)
        deadline = None if self.track_timeout is None else time.monotonic() + self.track_timeout
        self._start_workers()
        while True:
            changed = self._changed
            if self.buffer.offer(event):
                return event.id
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise BufferFull(
                    f"the buffer holds {self.buffer.max_events} events (the gateway is slow or away) and had "
                    f"no room within {self.track_timeout} s; nothing was dropped, this event was not tracked"
                )
            await self._wait_change(changed, left)

    async def send(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Send these events now, in one request (retried within the budget); their ids."""
        self.check_open()
        ids, body = prepare_batch(events)
        if ids:
            await request_with_retry(
                self._http, self.retry, "POST", "/v1/events", ids, self.stats, content=body, headers=_JSON
            )
        return ids

    async def flush(self) -> None:
        """Send every event tracked before this call and wait until the gateway has taken it (raises as
        MeterClient.flush)."""
        through = self.buffer.last_seq  # the events tracked before this call
        while not self.buffer.settled_through(through):
            changed = self._changed
            batch = self.buffer.take(self.take_size())
            if batch:
                await self._deliver(batch, background=False)
                continue
            await self._wait_change(changed, 0.5)  # the rest is in flight with the background tasks
        self.raise_rejections()

    async def aclose(self) -> None:
        """Flush, stop the background tasks, close the connections. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.flush()
        finally:
            self._stopping = True
            self._signal()
            if self._workers:
                await asyncio.gather(*self._workers, return_exceptions=True)
            await self._http.aclose()
            core.unregister_for_exit(self)

    async def __aenter__(self) -> AsyncMeterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _close_at_exit(self) -> None:
        """At interpreter exit (the loop is gone): send what is left with a synchronous client."""
        self.closed = True
        leftover = [e for batch in self._sending.values() for e in batch] + self.buffer.snapshot()
        if not leftover:
            return
        with httpx.Client(base_url=self.base_url, headers=self.headers(), timeout=self._timeout) as http:
            for start in range(0, len(leftover), self.batch_size):
                post_batch(http, self.retry, leftover[start : start + self.batch_size], self.stats)
        self.buffer.take(self.buffer.queued)
        self._sending.clear()

    # --- the background tasks -------------------------------------------------------------------

    def _start_workers(self) -> None:
        # (Again when the tasks are gone: their loop ended without aclose() and a new one tracks.)
        if not self._stopping and all(task.done() for task in self._workers):
            self._workers = [asyncio.create_task(self._run()) for _ in range(self._concurrency)]

    async def _run(self) -> None:
        """Send a batch whenever one is due, until the client closes."""
        while not self._stopping:
            changed = self._changed
            if not self.buffer.ready(self.take_size(), self.flush_interval):
                await self._wait_change(changed, self.buffer.due_in(self.flush_interval))
                continue
            batch = self.buffer.take(self.take_size())
            if batch:
                await self._deliver(batch, background=True)

    async def _deliver(self, batch: list[Encoded], background: bool) -> None:
        """Send one batch taken from the buffer and settle it: done, refused, or back in the queue."""
        key = id(batch)
        self._sending[key] = batch
        try:
            await request_with_retry(
                self._http, self.retry, "POST", "/v1/events", [e.id for e in batch], self.stats,
                content=batch_body(batch), headers=_JSON,
            )  # fmt: skip
        except ApiError as exc:
            self.refused(batch, exc)
            return
        except DeliveryError as exc:
            self.undelivered(batch, exc, background)
            if not background:
                raise
            return
        except asyncio.CancelledError:  # the loop is ending: the batch waits in the buffer for exit
            self.buffer.requeue(batch, due_now=True)
            raise
        except Exception as exc:  # a bug or an unexpected failure: keep the events, say so
            error = DeliveryError(f"sending failed: {exc!r}", exc, 1, [e.id for e in batch])
            self.undelivered(batch, error, background)
            if not background:
                raise
            return
        finally:
            self._sending.pop(key, None)
        self.buffer.done(batch)

    # --- reading --------------------------------------------------------------------------------

    async def _get(
        self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None
    ) -> bytes:
        self.check_open()
        return (
            await request_with_retry(self._http, self.retry, "GET", path, stats=self.stats, params=params)
        ).content

    async def usage(
        self,
        meter: str,
        customer_id: str | None = None,
        from_: datetime | str | None = None,
        to: datetime | str | None = None,
        window: str | None = None,
        group_by: str | Sequence[str] | None = None,
        tz: str | None = None,
        offset: int | None = None,
        filters: Mapping[str, str | Sequence[str]] | None = None,
    ) -> Usage:
        """``GET /v1/meters/{meter}/usage`` over ``[from_, to)`` (default: from the first event to now);
        ``filters``: dimension -> a value or several, e.g. ``{"region": ["eu-west-1", "us-east-1"]}``."""
        path, params = core.usage_request(
            meter, customer_id, from_, to, window, group_by, tz, offset, filters
        )
        return core.decode(await self._get(path, params), Usage)

    async def event(self, id: str) -> StoredEvent | None:
        """``GET /v1/events/{id}``: the event and its state; None when the gateway never accepted it."""
        try:
            return core.decode(await self._get(core.event_path(id)), StoredEvent)
        except NotFound:
            return None

    async def invoices(
        self, customer_id: str | None = None, period: str | None = None, status: str | None = None
    ) -> list[Invoice]:
        """``GET /v1/invoices`` filtered by customer, month (``YYYY-MM``) and ``draft``/``final``."""
        params = core.invoices_params(customer_id, period, status)
        return core.invoices_of(await self._get("/v1/invoices", params))

    async def meters(self) -> list[Meter]:
        """``GET /v1/meters``: the catalog's meters."""
        return core.meters_of(await self._get("/v1/meters"))

    async def status(self) -> IngestStatus:
        """``GET /v1/ingest/status``: stream, consumer and ledger totals."""
        return core.decode(await self._get("/v1/ingest/status"), IngestStatus)
