"""What every compatible ingest API shares: ids scoped to their peer, and one way into the stream.

An event arriving through a peer's API takes the same path as ``POST /v1/events`` from here on:
checked by the same envelope rules, refused whole when any item is bad, and answered only after
JetStream has it on disk (:meth:`~ingest_gateway.gateway.Gateway.publish`).
"""

from __future__ import annotations

import hashlib

from ingest_gateway.gateway import Gateway
from ingest_gateway.http import ApiError
from meter_platform.capture.envelope import Event, ItemError, check_times

#: An event id is at most this long (the contract).
MAX_ID = 128


def scoped_id(peer: str, *parts: str) -> str:
    """The platform id of a peer's event id: ``<peer>:<parts joined by ':'>``.

    Scoping keeps a Lago ``transaction_id`` from colliding with an OpenMeter or Stripe id (or a
    ``/v1`` id). An id that would be longer than :data:`MAX_ID` becomes ``<peer>:sha256:<hex>``, still
    stable, so a resend is recognised.
    """
    raw = ":".join(parts)
    scoped = f"{peer}:{raw}"
    if len(scoped) <= MAX_ID:
        return scoped
    return f"{peer}:sha256:{hashlib.sha256(raw.encode()).hexdigest()}"


async def accept(gw: Gateway, events: list[Event], received_us: int) -> list[ItemError]:
    """Check ``events`` as the gateway checks its own (times: not too far ahead, parseable) and, when
    every one passes, publish them durably; returns the problems found (nothing is published then).

    Every event must carry its id already. Raises :class:`ApiError` 503 when JetStream does not
    confirm the publish (and 403/429 from the API key's checks): the caller maps it to its peer's
    error shape.
    """
    errors = check_times(list(events), received_us)
    if errors:
        return errors
    assert all(e.id for e in events), "peer events carry their scoped id"
    await gw.publish(events, received_us)
    return []


__all__ = ["MAX_ID", "ApiError", "accept", "scoped_id"]
