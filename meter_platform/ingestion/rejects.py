"""Step 3c of the micro-batch (see :mod:`meter_platform.ingestion.writer`): rejected events kept in
``quarantined_events`` with their reasons, never dropped. A quarantine replay shares it through the
writer.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
import psycopg

from meter_platform.capture.messages import Rejected

_json = msgspec.json.Encoder()


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: keep it visible as the JSON escape instead."""
    return text.replace("\x00", "\\u0000") if text is not None and "\x00" in text else text


def _storable_payload(q: Rejected) -> tuple[str | None, str | None]:
    """(payload as jsonb text, raw text) for a rejected item; jsonb cannot hold NUL, so such a
    payload is kept as its JSON text instead."""
    if q.payload is None:
        return None, _no_nul(q.payload_text)
    encoded = _json.encode(q.payload).decode()
    if "\\u0000" in encoded:
        return None, encoded
    return encoded, _no_nul(q.payload_text)


def quarantine_rejected(cur: psycopg.Cursor, todo: list[Rejected]) -> dict[int, int]:
    """Step 3c, inside the caller's transaction: keep rejected events with their reasons.

    An event whose id is stored already is a duplicate, not quarantined; an id quarantined before
    is not quarantined again. Returns the number quarantined per stream sequence.
    """
    if not todo:
        return {}
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS incoming_q (LIKE quarantined_events) ON COMMIT DELETE ROWS")
    with cur.copy(
        "COPY incoming_q (quarantine_id, event_id, event_type, customer_id, ts, received_at, payload,"
        " payload_text, reasons, stream_seq, quarantined_at, status) FROM STDIN"
    ) as copy:
        now = datetime.now().astimezone()
        for n, q in enumerate(todo):
            payload, payload_text = _storable_payload(q)
            copy.write_row(
                (
                    n,
                    _no_nul(q.event_id),
                    _no_nul(q.event_type),
                    _no_nul(q.customer_id),
                    q.ts,
                    q.received,
                    payload,
                    payload_text,
                    _json.encode([f.as_json() for f in q.reasons]).decode(),
                    q.seq,
                    now,
                    "quarantined",
                )
            )
    return dict(
        cur.execute(
            "WITH ins AS (INSERT INTO quarantined_events (event_id, event_type, customer_id, ts, received_at,"
            " payload, payload_text, reasons, stream_seq)"
            " SELECT event_id, event_type, customer_id, ts, received_at, payload, payload_text, reasons,"
            " stream_seq FROM incoming_q q WHERE q.event_id IS NULL OR NOT EXISTS"
            " (SELECT 1 FROM event_ids u WHERE u.id = q.event_id) ORDER BY quarantine_id"
            " ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING RETURNING stream_seq)"
            " SELECT stream_seq, count(*) FROM ins GROUP BY 1"
        ).fetchall()
    )
