"""The platform's error types. Domain code raises them with a message that says what to do; the
gateway maps each to its HTTP status, the CLI prints the message and exits non-zero."""

from __future__ import annotations


class PlatformError(Exception):
    """Base of the errors a user can act on; ``status`` is the HTTP status the gateway answers with."""

    status = 400

    def __init__(self, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidRequest(PlatformError):
    """The request cannot be carried out as asked (a 400)."""

    status = 400


class NotFound(PlatformError):
    """What the request names does not exist (a 404)."""

    status = 404


class Conflict(PlatformError):
    """The request conflicts with the state it would change (a 409): retry later or change the request."""

    status = 409
