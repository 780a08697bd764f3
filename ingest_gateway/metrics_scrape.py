"""Reading the figures of ``GET /metrics`` at scrape time, within bounds.

A scrape reads NATS once (stream, consumers, oldest waiting message) and then PostgreSQL once
(:func:`~ingest_gateway.metrics_pipeline.ledger_sql`), each through the gateway's bounded reads, so it
answers in about :data:`SCRAPE_DEADLINE` seconds even when a server hangs: what did not come is
left out and ``meter_scrape_dependency_up`` says which (:mod:`ingest_gateway.metrics_pipeline`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from nats.js import JetStreamContext

from ingest_gateway.gateway import Gateway
from ingest_gateway.metrics_pipeline import LedgerFigures, Snapshot, StreamFigures, ledger_sql
from meter_platform.capture import jetstream
from meter_platform.config import STREAM_NAME

log = logging.getLogger("ingest_gateway")
#: A scrape answers within about this long (NATS slow too: at most its bound plus :data:`_DB_MIN`).
SCRAPE_DEADLINE = 1.5
#: NATS gets at most this much of it; PostgreSQL the rest (at least :data:`_DB_MIN`).
_NATS_TIMEOUT = 1.0
_DB_MIN = 0.5


async def _read_stream(js: JetStreamContext) -> StreamFigures:
    """The stream, its consumers summed (one per partition; ``ack_floor`` the lowest) and the oldest
    message any of them waits for."""
    stream = await js.stream_info(STREAM_NAME)
    summed = jetstream.summed(stream, await jetstream.consumer_infos(js))
    ack_pending = summed.ack_pending
    pending = summed.pending + ack_pending
    oldest = await jetstream.oldest_pending(js) if pending else None
    return StreamFigures(
        last_seq=stream.state.last_seq,
        first_seq=stream.state.first_seq,
        messages=stream.state.messages,
        bytes=stream.state.bytes,
        created=stream.created if isinstance(stream.created, datetime) else None,
        pending=pending,
        ack_pending=ack_pending,
        ack_floor=summed.ack_floor,
        oldest_waiting=oldest,
    )


async def take_snapshot(gw: Gateway) -> Snapshot:
    """Read NATS, then PostgreSQL (one query, using the stream's range), each within its bound."""
    started = time.monotonic()
    snap = Snapshot()
    try:
        snap.stream = await gw.read_nats(_read_stream, timeout=_NATS_TIMEOUT)
    except Exception as exc:  # a scrape reports a dependency that fails; it never fails itself
        log.warning("metrics without nats: %r", exc)
    s = snap.stream
    with_range = s is not None and s.created is not None and s.messages > 0
    params = {"created": s.created, "first": s.first_seq, "last": s.last_seq} if with_range and s else {}
    remaining = max(_DB_MIN, SCRAPE_DEADLINE - (time.monotonic() - started))
    try:
        rows = await gw.read_db(ledger_sql(with_range), params, timeout=remaining)
        snap.ledger = LedgerFigures.from_row(tuple(rows[0]))
    except Exception as exc:
        log.warning("metrics without postgres: %r", exc)
    snap.seconds = time.monotonic() - started
    return snap
