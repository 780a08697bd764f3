"""The SDK's errors: one base class, the gateway's refusals typed by status, and delivery failures.

Every error the gateway answers has the shape ``{"error": "<one sentence>", "details": [...]}``; a
refused batch (400) lists each bad item as ``{"index", "field", "message"}`` in ``details``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meter_platform.sdk.models import ItemError


class MeterError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ApiError(MeterError):
    """The gateway refused a request; ``status``, its ``error`` sentence and its ``details``.

    ``details`` holds the raw detail objects; ``item_errors`` those that name a batch item (400).
    """

    def __init__(
        self, status: int, error: str, details: Sequence[Any] = (), retry_after: float | None = None
    ):
        super().__init__(f"{status}: {error}")
        self.status = status
        self.error = error
        self.details = list(details)
        self.retry_after = retry_after

    @property
    def item_errors(self) -> list[ItemError]:
        """The details that name a bad item of the batch (``index``, ``field``, ``message``)."""
        out = []
        for d in self.details:
            if isinstance(d, dict) and isinstance(d.get("index"), int):
                out.append(
                    ItemError(
                        index=d["index"], field=str(d.get("field", "")), message=str(d.get("message", ""))
                    )
                )
        return out


class InvalidRequest(ApiError):
    """400: the request (for a batch: at least one event) is invalid; ``item_errors`` say which."""


class AuthenticationError(ApiError):
    """401: no API key, or an unknown or revoked one."""


class PermissionDenied(ApiError):
    """403: the key's scopes (or its customer) do not allow this."""


class NotFound(ApiError):
    """404."""


class PayloadTooLarge(ApiError):
    """413: the batch is larger than the gateway's body limit (5 MiB by default)."""


class RateLimited(ApiError):
    """429: the key is over its rate (retried by the SDK; raised only once the retry budget is spent)."""


class Unavailable(ApiError):
    """502, 503, 504: the gateway cannot make the events durable now (retried by the SDK)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def api_error(
    status: int, error: str, details: Sequence[Any] = (), retry_after: float | None = None
) -> ApiError:
    """The typed error for a status (ApiError itself for a status without its own class)."""
    return _BY_STATUS.get(status, ApiError)(status, error, details, retry_after)


class DeliveryError(MeterError):
    """Events could not be delivered within the retry budget (the gateway stayed unreachable or busy).

    ``cause`` is the last failure (an :class:`ApiError` such as :class:`Unavailable`, or the transport
    error), ``attempts`` how many requests were made, ``ids`` the ids of the events not delivered.
    Events of a background batch stay in the client's buffer and are tried again.
    """

    def __init__(self, message: str, cause: BaseException | None, attempts: int, ids: Sequence[str]):
        super().__init__(message)
        self.cause = cause
        self.attempts = attempts
        self.ids = list(ids)


class Rejection:
    """Events of a background batch the gateway refused for good, with the refusal."""

    def __init__(self, error: ApiError, events: list[dict[str, Any]]):
        self.error = error
        self.events = events

    def __repr__(self) -> str:
        return f"Rejection({self.error!r}, {len(self.events)} events)"


class RejectedEvents(MeterError):
    """Raised by ``flush()``/``close()``: the gateway refused buffered events (a 4xx other than 429).

    ``rejections`` lists each refusal with the refused events (for a 400: only the bad ones, with
    ``item_errors`` indexed into that list; the good events of the batch were sent again).
    """

    def __init__(self, rejections: list[Rejection]):
        count = sum(len(r.events) for r in rejections)
        first = rejections[0].error
        super().__init__(f"the gateway refused {count} buffered event(s); first: {first}")
        self.rejections = rejections


class BufferFull(MeterError):
    """``track`` waited ``timeout`` seconds for room in the full buffer (events are never dropped)."""


class ClientClosed(MeterError):
    """The client was closed; it tracks and sends nothing more."""
