"""When to retry and how long to wait: exponential backoff with jitter, ``Retry-After`` honoured,
within a total budget per request. Shared by the sync and async clients (they only sleep differently).

Retried: 429, 502, 503, 504, and transport failures (connection refused or reset, timeouts). A retry
resends the same body, with the same event ids, so the gateway counts each event once. Any other
4xx or 5xx is raised at once as a typed :class:`~meter_platform.sdk.errors.ApiError`.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec

from meter_platform.sdk.errors import ApiError, DeliveryError, api_error

RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Transport failures worth retrying: the gateway is away or slow. (Not a malformed URL or the like.)
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How one request is retried.

    ``budget``: seconds from the first attempt after which no new attempt starts and
    :class:`~meter_platform.sdk.errors.DeliveryError` is raised. Waits grow from ``initial_backoff``,
    doubling up to ``max_backoff``, each a random point in its upper half (jitter, so many clients do
    not retry in step); a ``Retry-After`` answer is waited at least that long.
    """

    budget: float = 60.0
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        return max(wait, retry_after) if retry_after is not None else wait


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error of a non-2xx answer, with the gateway's ``error`` and ``details``."""
    error, details = response.reason_phrase or "error", list[Any]()
    try:
        body: Any = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict):
        error = str(body.get("error") or error)
        raw = body.get("details")
        details = raw if isinstance(raw, list) else []
    elif response.content:
        error = response.text[:500]
    return api_error(
        response.status_code, error, details, parse_retry_after(response.headers.get("retry-after"))
    )


class RequestStats:
    """What a client's requests did so far: requests made (retries included) and retries."""

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()

    def add(self, requests: int = 0, retries: int = 0) -> None:
        """Count requests and retries (from any thread)."""
        with self._lock:
            self.requests += requests
            self.retries += retries

    def __repr__(self) -> str:
        return f"RequestStats(requests={self.requests}, retries={self.retries})"


class Attempts:
    """The bookkeeping of one request's retries; the loop itself is in each client (sleep differs)."""

    def __init__(self, policy: RetryPolicy, ids: list[str], what: str, stats: RequestStats | None = None):
        self.policy = policy
        self.ids = ids
        self.what = what
        self.stats = stats or RequestStats()
        self.count = 0
        self.started = time.monotonic()
        self.last: BaseException | None = None

    def attempt(self) -> None:
        """A request is about to go out."""
        self.count += 1
        self.stats.add(requests=1)

    def next_delay(self, failure: BaseException) -> float:
        """Record a retryable failure; the wait before the next attempt, or DeliveryError when the
        budget does not allow another one."""
        self.last = failure
        retry_after = failure.retry_after if isinstance(failure, ApiError) else None
        wait = self.policy.delay(self.count, retry_after)
        if time.monotonic() + wait - self.started > self.policy.budget:
            events = f" ({len(self.ids)} events)" if self.ids else ""
            raise DeliveryError(
                f"{self.what}{events}: gave up after {self.count} attempt(s) in "
                f"{time.monotonic() - self.started:.1f} s (retry budget {self.policy.budget:g} s); "
                f"last failure: {failure!r}",
                failure,
                self.count,
                self.ids,
            ) from failure
        self.stats.add(retries=1)
        return wait


def outcome(response: httpx.Response) -> ApiError | None:
    """None for a 2xx; the typed error otherwise (retryable when its status is in RETRY_STATUSES)."""
    if 200 <= response.status_code < 300:
        return None
    return error_from_response(response)
