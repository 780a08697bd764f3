"""``MeterClient``: the synchronous client. ``track`` buffers, background threads send batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from meter_platform.sdk import core
from meter_platform.sdk.core import ClientCore, ErrorCallback
from meter_platform.sdk.errors import ApiError, DeliveryError, NotFound
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


def request_with_retry(
    http: httpx.Client,
    policy: RetryPolicy,
    method: str,
    path: str,
    ids: Sequence[str] = (),
    stats: RequestStats | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One request, retried on 429/502/503/504 and transport failures within the policy's budget.

    Returns the 2xx answer; raises the typed ApiError of any other answer (never retried), or
    DeliveryError when the budget is spent. A retry sends the same body (the same event ids).
    """
    attempts = Attempts(policy, list(ids), f"{method} {path}", stats)
    while True:
        attempts.attempt()
        try:
            response = http.request(method, path, **kwargs)
        except RETRY_EXCEPTIONS as exc:
            time.sleep(attempts.next_delay(exc))
            continue
        error = outcome(response)
        if error is None:
            return response
        if error.status not in RETRY_STATUSES:
            raise error
        time.sleep(attempts.next_delay(error))


def post_batch(
    http: httpx.Client, policy: RetryPolicy, batch: list[Encoded], stats: RequestStats | None = None
) -> None:
    """POST one batch of events until the gateway accepts it (see request_with_retry)."""
    ids = [e.id for e in batch]
    request_with_retry(
        http, policy, "POST", "/v1/events", ids, stats, content=batch_body(batch), headers=_JSON
    )


class MeterClient(ClientCore):
    """A client of the meter platform's gateway, safe to share between threads.

    ``track`` checks and encodes an event, queues it and returns its id at once; ``concurrency``
    background threads send a batch when ``batch_size`` events are queued or the oldest has waited
    ``flush_interval`` seconds. The buffer holds at most ``max_buffer`` events (those being sent
    included); on a full buffer ``track`` waits up to ``track_timeout`` seconds, then raises BufferFull.

    A batch the gateway cannot take now (503, 429, connection errors, timeouts) is retried with the
    same ids for ``retry.budget`` seconds; after that it goes back to the buffer (tried again, never
    dropped) and ``on_error(DeliveryError, events)`` is told. A batch refused for good (a 4xx other
    than 429; for a 400 only its bad events) is given to ``on_error`` and raised by the next
    ``flush()``/``close()`` as RejectedEvents. Without ``on_error``, both are logged.
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
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers(), timeout=timeout, limits=limits
        )
        self._concurrency = concurrency
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self._start_lock = threading.Lock()
        core.register_for_exit(self)

    # --- sending --------------------------------------------------------------------------------

    def track(
        self,
        event_type: str,
        customer_id: str,
        properties: Mapping[str, Any] | None = None,
        id: str | None = None,
        timestamp: datetime | str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue one event for the next batch; its id (a UUIDv7 when not given).

        The timestamp (aware datetime or RFC 3339 string; default now) is fixed here. Raises
        ValueError/TypeError for a malformed event, BufferFull when no room came within
        ``track_timeout``, ClientClosed after ``close()``.
        """
        self.check_open()
        event = make_event(event_type, customer_id, properties, id, timestamp, metadata)
        self.buffer.put(event, self.track_timeout)
        self._start_workers()
        return event.id

    def send(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Send these events now, in one request (retried within the budget); their ids.

        Each event is a mapping with the fields of ``track``; a missing id or timestamp is made
        here. Raises InvalidRequest (with ``item_errors``) or another ApiError for a refusal (never
        retried), DeliveryError when the budget ran out.
        """
        self.check_open()
        ids, body = prepare_batch(events)
        if ids:
            request_with_retry(
                self._http, self.retry, "POST", "/v1/events", ids, self.stats, content=body, headers=_JSON
            )
        return ids

    def flush(self) -> None:
        """Send every event tracked before this call and wait until the gateway has taken it.

        Raises DeliveryError when a batch could not be delivered within the budget (its events stay
        queued), RejectedEvents when the gateway refused events since the last flush.
        """
        through = self.buffer.last_seq  # the events tracked before this call (others may track meanwhile)
        while not self.buffer.settled_through(through):
            batch = self.buffer.take(self.take_size())
            if batch:  # help the background threads (this may take newer events too: harmless)
                self._deliver(batch, background=False)
                continue
            with self.buffer.changed:  # the rest is in flight with the background threads
                self.buffer.changed.wait(0.05)
        self.raise_rejections()

    def close(self) -> None:
        """Flush, stop the background threads, close the connections. Idempotent.

        Raises what flush() raises; then the undelivered events are still in ``pending()``.
        """
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            self._stop_workers()
            self._http.close()
            core.unregister_for_exit(self)

    def _close_at_exit(self) -> None:
        self.close()

    def __enter__(self) -> MeterClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the background threads -----------------------------------------------------------------

    def _start_workers(self) -> None:
        if self._workers:
            return
        with self._start_lock:
            if not self._workers and not self._stopping:
                self._workers = [
                    threading.Thread(target=self._run, name=f"meter-sdk-flush-{i}", daemon=True)
                    for i in range(self._concurrency)
                ]
                for worker in self._workers:
                    worker.start()

    def _stop_workers(self) -> None:
        with self.buffer.changed:
            self._stopping = True
            self.buffer.changed.notify_all()
        for worker in self._workers:
            worker.join(self.retry.budget + 30)

    def _run(self) -> None:
        """Send a batch whenever one is due, until the client closes."""
        buffer = self.buffer
        while True:
            with buffer.changed:
                while not buffer.ready(self.take_size(), self.flush_interval):
                    if self._stopping:
                        return
                    buffer.changed.wait(buffer.due_in(self.flush_interval))
                if self._stopping:
                    return
            batch = buffer.take(self.take_size())
            if batch:
                self._deliver(batch, background=True)

    def _deliver(self, batch: list[Encoded], background: bool) -> None:
        """Send one batch taken from the buffer and settle it: done, refused, or back in the queue."""
        try:
            post_batch(self._http, self.retry, batch, self.stats)
        except ApiError as exc:
            self.refused(batch, exc)
            return
        except DeliveryError as exc:
            self.undelivered(batch, exc, background)
            if not background:
                raise
            return
        except BaseException as exc:  # a bug or an unexpected failure: keep the events, say so
            error = DeliveryError(f"sending failed: {exc!r}", exc, 1, [e.id for e in batch])
            self.undelivered(batch, error, background)
            if not background or not isinstance(exc, Exception):
                raise
            return
        self.buffer.done(batch)

    # --- reading --------------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None) -> bytes:
        self.check_open()
        return request_with_retry(
            self._http, self.retry, "GET", path, stats=self.stats, params=params
        ).content

    def usage(
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
        return core.decode(self._get(path, params), Usage)

    def event(self, id: str) -> StoredEvent | None:
        """``GET /v1/events/{id}``: the event and its state; None when the gateway never accepted it."""
        try:
            return core.decode(self._get(core.event_path(id)), StoredEvent)
        except NotFound:
            return None

    def invoices(
        self, customer_id: str | None = None, period: str | None = None, status: str | None = None
    ) -> list[Invoice]:
        """``GET /v1/invoices`` filtered by customer, month (``YYYY-MM``) and ``draft``/``final``."""
        return core.invoices_of(self._get("/v1/invoices", core.invoices_params(customer_id, period, status)))

    def meters(self) -> list[Meter]:
        """``GET /v1/meters``: the catalog's meters."""
        return core.meters_of(self._get("/v1/meters"))

    def status(self) -> IngestStatus:
        """``GET /v1/ingest/status``: stream, consumer and ledger totals."""
        return core.decode(self._get("/v1/ingest/status"), IngestStatus)


__all__ = ["MeterClient", "post_batch", "request_with_retry"]
