"""GET /v1/ingest/status (the ledger that proves nothing was lost), GET /healthz and GET /readyz."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.gateway import gateway_of
from ingest_gateway.http import ApiError, json_response
from meter_platform.capture import jetstream
from meter_platform.capture.envelope import format_timestamp
from meter_platform.config import CONSUMER_NAME, STREAM_NAME
from meter_platform.ingestion.ledger import LEDGER_TOTALS_SQL, LedgerTotals


async def ingest_status(request: Request) -> Response:
    """GET /v1/ingest/status: the ledger that proves nothing was lost."""
    gw = gateway_of(request)
    assert gw.js is not None
    try:
        backlog = await jetstream.backlog(gw.js)
    except Exception as exc:
        raise ApiError(
            503, "The event broker is unreachable. Retry shortly.", headers={"Retry-After": "2"}
        ) from exc
    totals = LedgerTotals.from_row(tuple((await gw.query(LEDGER_TOTALS_SQL))[0]))
    return json_response(
        {
            "stream": {"name": STREAM_NAME, "last_seq": backlog.last_seq, "messages": backlog.messages},
            "consumer": {
                "name": CONSUMER_NAME,
                "pending": backlog.pending + backlog.ack_pending,
                "ack_pending": backlog.ack_pending,
                "ack_floor": backlog.ack_floor,
            },
            "events": {
                "processed": totals.processed,
                "stored": totals.stored,
                "duplicates": totals.duplicates,
                "quarantined": totals.quarantined,
                "balanced": totals.balanced,
                "replayed_from_quarantine": totals.replayed,
                "duplicates_from_quarantine": totals.replay_duplicates,
            },
            "quarantine_replays": {
                "replays": totals.replays,
                "last_finished_at": format_timestamp(totals.last_replay) if totals.last_replay else None,
            },
            "ledger": {
                "messages": totals.messages,
                "last_commit": format_timestamp(totals.last_commit) if totals.last_commit else None,
            },
        }
    )


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: NATS, the stream and PostgreSQL answer."""
    gw = gateway_of(request)
    checks: dict[str, str] = {}
    try:
        assert gw.js is not None and gw.nc is not None
        if not gw.nc.is_connected:  # fail fast instead of waiting for a JetStream timeout
            raise ConnectionError("not connected to NATS")
        await gw.js.stream_info(STREAM_NAME)
        checks["nats"] = checks["stream"] = "ok"
    except Exception as exc:
        checks["nats"] = f"failed: {exc!r}"
    try:
        await gw.query("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"failed: {exc!r}"
    ok = all(v == "ok" for v in checks.values()) and len(checks) == 3
    if not ok:
        return json_response(
            {"error": "Not ready: a dependency does not answer.", "details": [checks]},
            status=503,
            headers={"Retry-After": "2"},
        )
    return json_response({"status": "ready", "checks": checks})
