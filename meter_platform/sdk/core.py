"""What the sync and async clients share: settings, the API key, what to do with a batch's outcome
(accepted, refused for good, not delivered), and how read requests are built and their answers decoded.
Nothing here does I/O; each client sends and sleeps in its own way."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from meter_platform.sdk.buffer import EventBuffer
from meter_platform.sdk.errors import (
    ApiError,
    ClientClosed,
    InvalidRequest,
    MeterError,
    PayloadTooLarge,
    RejectedEvents,
    Rejection,
)
from meter_platform.sdk.events import Encoded, format_timestamp
from meter_platform.sdk.models import Invoice, Meter
from meter_platform.sdk.retry import RequestStats, RetryPolicy

log = logging.getLogger("meter_platform.sdk")
T = TypeVar("T")

#: Where ``make up`` leaves the admin key, relative to the directory the program runs in.
KEY_FILE = Path(".meter") / "api-key"
#: ``on_error(error, events)``: told of each background batch that failed (events as dicts).
ErrorCallback = Callable[[MeterError, list[dict[str, Any]]], None]


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else env ``METER_API_KEY``, else the file ``.meter/api-key`` here (else None)."""
    if api_key:
        return api_key
    if os.environ.get("METER_API_KEY"):
        return os.environ["METER_API_KEY"]
    try:
        return KEY_FILE.read_text().strip() or None
    except OSError:
        return None


class _Invoices(msgspec.Struct):
    invoices: list[Invoice]


class _Meters(msgspec.Struct):
    meters: list[Meter]


def connection_limits(concurrency: int) -> httpx.Limits:
    """The HTTP connection pool for ``concurrency`` batches in flight (plus room for reads)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    return httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)


def decode(content: bytes, type_: type[T]) -> T:
    """A typed answer from the JSON bytes (msgspec raises ValidationError on an unexpected shape)."""
    return msgspec.json.decode(content, type=type_)


def _time_param(value: datetime | str | None) -> str | None:
    return None if value is None else format_timestamp(value)


def usage_request(
    meter: str,
    customer_id: str | None,
    from_: datetime | str | None,
    to: datetime | str | None,
    window: str | None,
    group_by: str | Sequence[str] | None,
    tz: str | None,
    offset: int | None,
    filters: Mapping[str, str | Sequence[str]] | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """Path and query of ``GET /v1/meters/{slug}/usage`` (only the parameters given); ``filters``:
    dimension -> a value or several (any of them), as ``filter[<dimension>]=<value>``."""
    if group_by is not None and not isinstance(group_by, str):
        group_by = ",".join(group_by)
    params = {
        "customer_id": customer_id,
        "from": _time_param(from_),
        "to": _time_param(to),
        "window": window,
        "group_by": group_by,
        "tz": tz,
        "offset": None if offset is None else str(offset),
    }
    query = [(k, v) for k, v in params.items() if v is not None]
    for dim, values in (filters or {}).items():
        query += [(f"filter[{dim}]", v) for v in ([values] if isinstance(values, str) else values)]
    return f"/v1/meters/{quote(meter, safe='')}/usage", query


def event_path(event_id: str) -> str:
    """``/v1/events/{id}`` with the id escaped (ids may hold ``/``, ``?``, spaces)."""
    return f"/v1/events/{quote(event_id, safe='')}"


def invoices_params(customer_id: str | None, period: str | None, status: str | None) -> dict[str, str]:
    """The query of ``GET /v1/invoices``."""
    params = {"customer_id": customer_id, "period": period, "status": status}
    return {k: v for k, v in params.items() if v is not None}


def invoices_of(content: bytes) -> list[Invoice]:
    """The invoices of a ``GET /v1/invoices`` answer."""
    return decode(content, _Invoices).invoices


def meters_of(content: bytes) -> list[Meter]:
    """The meters of a ``GET /v1/meters`` answer."""
    return decode(content, _Meters).meters


class ClientCore:
    """Settings and batch bookkeeping shared by :class:`MeterClient` and :class:`AsyncMeterClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        batch_size: int,
        flush_interval: float,
        max_buffer: int,
        track_timeout: float | None,
        retry: RetryPolicy | None,
        on_error: ErrorCallback | None,
    ):
        if batch_size < 1 or flush_interval <= 0:
            raise ValueError("batch_size must be at least 1 and flush_interval above 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = resolve_api_key(api_key)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.track_timeout = track_timeout
        self.retry = retry or RetryPolicy()
        self.on_error = on_error
        #: Requests made and retried so far (all of this client's requests).
        self.stats = RequestStats()
        self.buffer = EventBuffer(max_buffer)
        self.closed = False
        #: Batches refused for good since the last flush()/close() raised them.
        self.rejections: list[Rejection] = []
        self._rejections_lock = threading.Lock()
        # Lowered after a 413, so a batch too large for the gateway is sent in smaller ones.
        self._batch_limit = batch_size

    def headers(self) -> dict[str, str]:
        """Headers every request sends."""
        headers = {"User-Agent": "meter-platform-sdk"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def take_size(self) -> int:
        """How many events the next batch takes."""
        return min(self.batch_size, self._batch_limit)

    def check_open(self) -> None:
        """ClientClosed once the client is closed."""
        if self.closed:
            raise ClientClosed("the client is closed; create a new one")

    def pending(self) -> list[dict[str, Any]]:
        """The events still queued (not yet delivered), as dicts: what a failed close() leaves."""
        return [e.decoded() for e in self.buffer.snapshot()]

    def report(self, error: MeterError, batch: list[Encoded]) -> None:
        """Tell ``on_error`` (or the log) about a background batch that failed."""
        if self.on_error is None:
            log.warning("meter SDK: %d event(s): %s", len(batch), error)
            return
        try:
            self.on_error(error, [e.decoded() for e in batch])
        except Exception:  # the callback's own bug must not stop the flusher
            log.exception("meter SDK: the on_error callback raised")

    def undelivered(self, batch: list[Encoded], error: MeterError, background: bool) -> None:
        """The retry budget ran out: the batch goes back to the buffer's front (tried again later)."""
        self.buffer.requeue(batch)
        if background:
            self.report(error, batch)

    def refused(self, batch: list[Encoded], error: ApiError) -> None:
        """The gateway refused the batch for good (a 4xx other than 429).

        A 413 of more than one event: the batch goes back and later batches are half as large.
        A 400 naming its bad items: only those are rejected, the others are sent again (same ids).
        Anything else: the whole batch is rejected. Rejected events are kept in ``rejections``
        (flush() and close() raise them as RejectedEvents) and given to ``on_error``.
        """
        if isinstance(error, PayloadTooLarge) and len(batch) > 1:
            self._batch_limit = max(1, len(batch) // 2)
            self.buffer.requeue(batch, due_now=True)
            return
        bad = sorted({e.index for e in error.item_errors if 0 <= e.index < len(batch)})
        if isinstance(error, InvalidRequest) and bad and len(bad) < len(batch):
            new_index = {old: new for new, old in enumerate(bad)}
            details = [
                {**d, "index": new_index[d["index"]]}
                for d in error.details
                if isinstance(d, dict) and d.get("index") in new_index
            ]
            good = [e for i, e in enumerate(batch) if i not in new_index]
            rejected = [batch[i] for i in bad]
            error = InvalidRequest(error.status, error.error, details)
            self.buffer.requeue(good, due_now=True)
            self.buffer.done(rejected)
        else:
            rejected = batch
            self.buffer.done(batch)
        with self._rejections_lock:
            self.rejections.append(Rejection(error, [e.decoded() for e in rejected]))
        self.report(error, rejected)

    def raise_rejections(self) -> None:
        """RejectedEvents for the refusals not raised yet (then forgotten by the client)."""
        with self._rejections_lock:
            rejections, self.rejections = self.rejections, []
        if rejections:
            raise RejectedEvents(rejections)


# --- a flush at interpreter exit for clients not closed -----------------------------------------

_open_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def register_for_exit(client: Any) -> None:
    """Flush ``client`` (its ``_close_at_exit``) when the interpreter exits, unless closed before."""
    global _atexit_registered
    with _atexit_lock:
        _open_clients.add(client)
        if not _atexit_registered:
            atexit.register(_close_all_at_exit)
            _atexit_registered = True


def unregister_for_exit(client: Any) -> None:
    """The client was closed: nothing to do for it at exit."""
    _open_clients.discard(client)


def _close_all_at_exit() -> None:
    for client in list(_open_clients):
        try:
            client._close_at_exit()
        except MeterError as exc:
            log.error("meter SDK at exit: %s; %d event(s) not delivered", exc, len(client.buffer))
        except Exception:
            log.exception("meter SDK at exit: flushing failed")
