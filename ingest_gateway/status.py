"""GET /v1/ingest/status (the ledger that proves nothing was lost), GET /healthz and GET /readyz.

Both /v1/ingest/status and /readyz answer within about two seconds whatever NATS and PostgreSQL do:
each dependency is read within a bound (:class:`~ingest_gateway.health.Dependency`), and one that
does not answer is reported, not waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AccountInfo, StreamInfo
from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.gateway import Gateway, gateway_of
from ingest_gateway.health import PUBLISH_FAILURE_HOLD, NoAnswer, PublishOutcomes
from ingest_gateway.http import ApiError, json_response
from meter_platform.capture import jetstream
from meter_platform.capture.envelope import format_timestamp
from meter_platform.config import CONSUMER_NAME, STREAM_NAME
from meter_platform.ingestion.ledger import LEDGER_TOTALS_SQL, LedgerTotals

log = logging.getLogger("ingest_gateway")
#: /v1/ingest/status answers within about this long, with what it knows by then.
STATUS_DEADLINE = 2.0
#: What a dependency that is down, frozen or refusing raises through the bounded reads.
_UNAVAILABLE = (NoAnswer, ApiError, NatsError, OSError, TimeoutError)

#: Ledger rows of the current stream incarnation within the stream's sequence range.
LEDGER_IN_RANGE_SQL = (
    "SELECT count(*) FROM ingest_messages"
    " WHERE stream_created = :created AND stream_seq BETWEEN :first AND :last"
)


# --- GET /v1/ingest/status --------------------------------------------------------------------------


async def _stream_and_consumers(js: JetStreamContext) -> tuple[StreamInfo, jetstream.Backlog]:
    """The stream, and its consumers summed (one per partition; one when unpartitioned)."""
    stream, consumers = await asyncio.gather(js.stream_info(STREAM_NAME), jetstream.consumer_infos(js))
    return stream, jetstream.summed(stream, consumers)


async def _uncounted(gw: Gateway, stream: StreamInfo, timeout: float) -> int:
    """Messages in the stream that the ledger does not have: the backlog still to be processed.

    Only the pipeline removes messages from the middle of the stream (a work queue), and it acks a
    message only after committing it to the ledger. So every sequence between the stream's first and
    last that is not in the ledger is still in the stream, unprocessed, and every other message in
    the stream is already counted (its ack was lost, e.g. in a NATS disk-full incident; a redelivery
    will only ack it). One indexed count, whatever the size of the gaps. A message deleted by hand
    from the middle of the stream would be counted here too; the answer is capped at the stream's
    message count.
    """
    state = stream.state
    if state.messages == 0 or stream.created is None:
        return 0
    rows = await gw.read_db(
        LEDGER_IN_RANGE_SQL,
        {"created": stream.created, "first": state.first_seq, "last": state.last_seq},
        timeout=timeout,
    )
    in_ledger = int(rows[0][0])
    return max(0, min(state.messages, state.last_seq - state.first_seq + 1 - in_ledger))


def _stream_fields(
    stream: StreamInfo | None, consumers: jetstream.Backlog | None, uncounted: int | None
) -> dict[str, Any]:
    """The "stream" and "consumer" parts; their numbers are null when NATS did not answer.

    With several partitions, "consumer" sums their consumers (``ack_floor``: the lowest) and
    "partitions" lists each one's figures; unpartitioned, it lists the one consumer.
    """
    pending = ack_pending = ack_floor = None
    partitions: list[dict[str, Any]] = []
    if consumers is not None:
        ack_pending = consumers.ack_pending
        pending = consumers.pending + ack_pending
        ack_floor = consumers.ack_floor
        partitions = [
            {
                "partition": c.partition,
                "name": c.consumer,
                "pending": c.pending + c.ack_pending,
                "ack_pending": c.ack_pending,
                "ack_floor": c.ack_floor,
            }
            for c in consumers.partitions
        ]
    names = [c["name"] for c in partitions]
    return {
        "stream": {
            "name": STREAM_NAME,
            "last_seq": stream.state.last_seq if stream else None,
            "messages": stream.state.messages if stream else None,
        },
        "consumer": {
            "name": names[0] if len(names) == 1 else f"{CONSUMER_NAME}-p*" if names else CONSUMER_NAME,
            "pending": pending,
            "ack_pending": ack_pending,
            "ack_floor": ack_floor,
            "uncounted": uncounted,
            "partitions": partitions,
        },
    }


def _ledger_fields(t: LedgerTotals | None) -> dict[str, Any]:
    """The "events", "quarantine_replays" and "ledger" parts; null when PostgreSQL did not answer."""
    return {
        "events": {
            "processed": t.processed if t else None,
            "stored": t.stored if t else None,
            "duplicates": t.duplicates if t else None,
            "quarantined": t.quarantined if t else None,
            "balanced": t.balanced if t else None,
            "replayed_from_quarantine": t.replayed if t else None,
            "duplicates_from_quarantine": t.replay_duplicates if t else None,
        },
        "quarantine_replays": {
            "replays": t.replays if t else None,
            "last_finished_at": format_timestamp(t.last_replay) if t and t.last_replay else None,
        },
        "ledger": {
            "messages": t.messages if t else None,
            "last_commit": format_timestamp(t.last_commit) if t and t.last_commit else None,
        },
    }


def _known(result: Any, part: str, degraded: list[str]) -> Any:
    """The result of a bounded read, or None (noting the part as degraded) if it did not come."""
    if isinstance(result, _UNAVAILABLE):
        log.warning("ingest status without %s: %r", part, result)
        degraded.append(part)
        return None
    if isinstance(result, BaseException):
        raise result
    return result


async def ingest_status(request: Request) -> Response:
    """GET /v1/ingest/status: the ledger that proves nothing was lost.

    ``consumer.pending`` is what JetStream reports (delivered-but-unacked included), summed over the
    partitions' consumers (each one's in ``consumer.partitions``);
    ``consumer.uncounted`` is how many of the stream's messages the ledger does not have, i.e. the
    backlog truly left to process (see :func:`_uncounted`): messages committed whose ack was lost
    are pending but not uncounted. ``degraded`` lists the dependencies ("nats", "postgres") that
    did not answer in time; the numbers that come from them are null, every field stays present.
    """
    gw = gateway_of(request)
    deadline = time.monotonic() + STATUS_DEADLINE
    degraded: list[str] = []
    nats_part, db_part = await asyncio.gather(
        gw.read_nats(_stream_and_consumers), gw.read_db(LEDGER_TOTALS_SQL), return_exceptions=True
    )
    stream, consumer = _known(nats_part, "nats", degraded) or (None, None)
    db_rows = _known(db_part, "postgres", degraded)
    totals = LedgerTotals.from_row(tuple(db_rows[0])) if db_rows is not None else None
    uncounted = None
    if stream is not None and totals is not None:
        remaining = max(0.2, deadline - time.monotonic())
        try:
            uncounted = await _uncounted(gw, stream, remaining)
        except _UNAVAILABLE as exc:
            uncounted = _known(exc, "postgres", degraded)
    return json_response(
        {**_stream_fields(stream, consumer, uncounted), **_ledger_fields(totals), "degraded": degraded}
    )


# --- GET /healthz, GET /readyz ----------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return json_response({"status": "ok"})


def _no_room(stream: StreamInfo, account: AccountInfo | None) -> str | None:
    """Why JetStream cannot take another message now, if its limits show it; else None."""
    cfg, state = stream.config, stream.state
    if cfg.max_msgs and cfg.max_msgs > 0 and state.messages >= cfg.max_msgs:
        return f"the stream is full ({state.messages} of at most {cfg.max_msgs} messages)"
    if cfg.max_bytes and cfg.max_bytes > 0 and state.bytes >= cfg.max_bytes:
        return f"the stream is full ({state.bytes} of at most {cfg.max_bytes} bytes)"
    if (
        account is not None
        and account.limits.max_storage > 0
        and account.storage >= account.limits.max_storage
    ):
        return f"the account's JetStream storage is full ({account.storage} bytes)"
    return None


def _publish_check(outcomes: PublishOutcomes, stream: StreamInfo, account: AccountInfo | None) -> str:
    """ "ok" unless the last publish failed, and JetStream has no room or failed only a moment ago."""
    if not outcomes.failing:
        return "ok"
    no_room = _no_room(stream, account)
    if no_room is not None:
        return f"failing: {no_room}; {outcomes.describe()}"
    if outcomes.seconds_since_failure() < PUBLISH_FAILURE_HOLD:
        return f"failing: {outcomes.describe()}"
    return "ok"  # room again and no failure for a while: let publishes show whether it holds


async def _nats_checks(gw: Gateway) -> dict[str, str]:
    """The "nats", "stream" and "publish" checks: one stream info (and account info after a failed
    publish), no publish."""
    failing = gw.publishes.failing

    async def probe(js: JetStreamContext) -> tuple[StreamInfo, AccountInfo | None]:
        return await js.stream_info(STREAM_NAME), await js.account_info() if failing else None

    try:
        stream, account = await gw.read_nats(probe)
    except Exception as exc:
        return {"nats": f"failed: {exc!r}", "stream": "unknown", "publish": "unknown"}
    return {"nats": "ok", "stream": "ok", "publish": _publish_check(gw.publishes, stream, account)}


async def _postgres_check(gw: Gateway) -> str:
    try:
        await gw.read_db("SELECT 1")
    except Exception as exc:
        return f"failed: {exc!r}"
    return "ok"


async def readyz(request: Request) -> Response:
    """GET /readyz: NATS, the stream and PostgreSQL answer (each within
    :data:`~ingest_gateway.health.DEPENDENCY_TIMEOUT`), and JetStream takes publishes: after a failed
    publish it stays 503 until one succeeds, or until the stream has room again and
    :data:`~ingest_gateway.health.PUBLISH_FAILURE_HOLD` has passed without a new failure."""
    gw = gateway_of(request)
    nats_checks, postgres = await asyncio.gather(_nats_checks(gw), _postgres_check(gw))
    checks = {**nats_checks, "postgres": postgres}
    failed = [name for name, value in checks.items() if value != "ok"]
    if failed:
        return json_response(
            {"error": f"Not ready: {', '.join(failed)} not ok (see details).", "details": [checks]},
            status=503,
            headers={"Retry-After": "2"},
        )
    return json_response({"status": "ready", "checks": checks})
