"""The micro-batch: JetStream messages in, raw events, quarantine, aggregates and ledger out.

This is where the platform's delivery guarantee is made. For each micro-batch, in this order:

1. **Fetch** up to N messages from the durable consumer. Nothing is acked yet; a process killed
   from here to step 5 leaves them un-acked, and JetStream redelivers them after ``ack_wait``.
2. **Decode and validate** in memory (gateway batches and directly published events alike).
3. **Write, in one PostgreSQL transaction**:
   a. claim each message's stream sequence in the ledger (``ingest_messages``, keyed by the
      stream's creation time and the sequence, since a re-created stream restarts at 1). A
      sequence already there was committed before (a redelivery after a crash between commit and
      ack, or a second run holding the same message): it is skipped whole, so it adds nothing;
   b. insert raw events ``ON CONFLICT (id) DO NOTHING``: an id already stored is a duplicate,
      however it arrived (a resend, another path, a redelivery, months later);
   c. quarantine what failed validation, with reasons (never dropped);
   d. upsert per-minute aggregates from the rows *newly inserted in b.* only, so a duplicate or a
      redelivery can never be counted twice;
   e. record per-message and per-batch counts, ``events = stored + duplicates + quarantined``.
4. **Commit.** Everything in 3 becomes visible at once, or nothing does.
5. **Then ack** the messages. A crash between 4 and 5 means redelivery, and 3a makes that a no-op:
   at-least-once delivery from JetStream + idempotent writes = each event counted exactly once.

Steps 2, 3b and 3d are methods of :class:`MicroBatchWriter` (``validate``, ``insert_raw``,
``aggregate_new``) that a quarantine replay (``meter_platform.ingestion.quarantine``) runs too, on events taken
back out of ``quarantined_events``: an event replayed from quarantine is validated, deduplicated and
aggregated by exactly the code that ingests it from JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import psycopg
from nats.errors import TimeoutError as NatsTimeoutError

from meter_platform.capture.envelope import (
    MAX_FUTURE_SKEW,
    convert_event,
    datetime_to_us,
    decode_any,
    decode_batch,
    format_timestamp,
    now_us,
    parse_timestamp,
    us_to_datetime,
)
from meter_platform.capture.jetstream import connect, ensure_stream_and_consumer, stream_incarnation
from meter_platform.catalog import Catalog
from meter_platform.config import BATCH_HEADER, CONSUMER_NAME, STREAM_NAME
from meter_platform.ingestion.validation import Failure, validate_event_type
from meter_platform.meters.aggregates import active_meters, aggregate_upsert_sql
from meter_platform.storage import db

log = logging.getLogger(__name__)


def default_max_lateness() -> timedelta:
    """How late an event may arrive and still be counted (``METER_MAX_LATENESS_DAYS``, default 35)."""
    return timedelta(days=float(os.environ.get("METER_MAX_LATENESS_DAYS", "35")))


_json = msgspec.json.Encoder()
T = TypeVar("T")


#: The stream incarnation of messages whose stream's creation time is not known (tests, tools).
STREAM_CREATED_UNKNOWN = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Message:
    """A JetStream message as the pipeline needs it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    timestamp_us: int  # when JetStream stored it
    # When the stream was created: sequences restart at 1 in a stream created again.
    stream_created: datetime = STREAM_CREATED_UNKNOWN


@dataclass
class BatchCounts:
    """What one micro-batch (or a whole run) did."""

    messages: int = 0
    events: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    redelivered: int = 0  # messages skipped because an earlier batch had committed them
    first_seq: int | None = None
    last_seq: int | None = None
    batches: int = 0

    def add(self, other: BatchCounts) -> None:
        """Fold another batch's counts into these."""
        for name in ("messages", "events", "stored", "duplicates", "quarantined", "redelivered", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.first_seq is not None:
            self.first_seq = (
                other.first_seq if self.first_seq is None else min(self.first_seq, other.first_seq)
            )
        if other.last_seq is not None:
            self.last_seq = other.last_seq if self.last_seq is None else max(self.last_seq, other.last_seq)

    @property
    def balanced(self) -> bool:
        """Every event is stored, a duplicate or quarantined."""
        return self.events == self.stored + self.duplicates + self.quarantined


@dataclass
class EventRows:
    """The batch's events in columns, as written to PostgreSQL."""

    ids: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    customer_ids: list[str] = field(default_factory=list)
    # The gateway's timestamps arrive normalized (UTC, microseconds) and go to PostgreSQL as text;
    # those of directly published events are parsed here, to check them.
    timestamps: list[datetime | str] = field(default_factory=list)
    received: list[datetime] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)


@dataclass
class Rejected:
    """An event (or an unreadable message) that failed a check, with the reasons."""

    event_id: str | None
    event_type: str | None
    customer_id: str | None
    ts: datetime | str | None
    received: datetime
    payload: Any
    payload_text: str | None
    reasons: list[Failure]
    seq: int


def decode_item(
    item: Any, received: datetime, seq: int, fallback_id: str, rows: EventRows, bad: list[Rejected]
) -> bool:
    """Check one event as directly published (a JSON value) and append it to ``rows`` or ``bad``.

    The envelope is checked as the gateway checks it at its door, and a timestamp more than
    ``MAX_FUTURE_SKEW`` after ``received`` is refused; ``fallback_id`` is the id of an event sent
    without one. Returns whether the event went to ``rows``. Used for messages published straight to
    NATS and for events replayed from quarantine.
    """
    event, error = convert_event(item)
    if event is None or error is not None:
        raw_id = item.get("id") if isinstance(item, dict) else None
        bad.append(
            Rejected(
                raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None,
                item.get("event_type")
                if isinstance(item, dict) and isinstance(item.get("event_type"), str)
                else None,
                item.get("customer_id")
                if isinstance(item, dict) and isinstance(item.get("customer_id"), str)
                else None,
                None,
                received,
                item,
                None,
                [
                    Failure(
                        error.field if error else "",
                        "invalid_envelope",
                        error.message if error else "invalid",
                    )
                ],
                seq,
            )
        )
        return False
    event_id = event.id or fallback_id
    ts = received
    if event.timestamp is not None:
        try:
            ts = parse_timestamp(event.timestamp)
        except ValueError as exc:  # RFC 3339 in form but not a date (month 13, year 0): as the gateway says
            bad.append(
                Rejected(
                    event_id,
                    event.event_type,
                    event.customer_id,
                    None,
                    received,
                    item,
                    None,
                    [Failure("timestamp", "invalid_envelope", str(exc))],
                    seq,
                )
            )
            return False
        if ts > received + MAX_FUTURE_SKEW:
            bad.append(
                Rejected(
                    event_id,
                    event.event_type,
                    event.customer_id,
                    ts,
                    received,
                    item,
                    None,
                    [
                        Failure(
                            "timestamp",
                            "future_timestamp",
                            "is more than 5 minutes ahead of the time JetStream stored it",
                        )
                    ],
                    seq,
                )
            )
            return False
    rows.ids.append(event_id)
    rows.event_types.append(event.event_type)
    rows.customer_ids.append(event.customer_id)
    rows.timestamps.append(ts)
    rows.received.append(received)
    rows.properties.append(event.properties)
    rows.metadata.append(event.metadata)
    rows.seqs.append(seq)
    return True


def _decode_message(
    msg: Message, rows: EventRows, bad: list[Rejected], per_msg_events: dict[int, int]
) -> None:
    """Append the message's events to ``rows`` (or ``bad``), counting them per message."""
    received = us_to_datetime(msg.timestamp_us)
    if msg.headers and BATCH_HEADER in msg.headers:
        batch = decode_batch(msg.data)
        received = us_to_datetime(batch.received_at)
        for ev in batch.events:
            assert ev.id is not None and ev.timestamp is not None  # the gateway fills both in
            rows.ids.append(ev.id)
            rows.event_types.append(ev.event_type)
            rows.customer_ids.append(ev.customer_id)
            rows.timestamps.append(ev.timestamp)
            rows.received.append(received)
            rows.properties.append(ev.properties)
            rows.metadata.append(ev.metadata)
            rows.seqs.append(msg.seq)
        per_msg_events[msg.seq] = len(batch.events)
        return

    # Published straight to NATS: check the envelope here, as the gateway does at its door.
    try:
        decoded = decode_any(msg.data)
    except msgspec.DecodeError as exc:
        bad.append(
            Rejected(
                None,
                None,
                None,
                None,
                received,
                None,
                msg.data.decode("utf-8", "replace"),
                [Failure("", "not_json", f"the message is not valid JSON ({exc})")],
                msg.seq,
            )
        )
        per_msg_events[msg.seq] = 1
        return
    items = decoded if isinstance(decoded, list) else [decoded]
    header_id = (msg.headers or {}).get("Nats-Msg-Id")
    for i, item in enumerate(items):
        # A stable id for events published without one: a redelivery then carries the same id.
        fallback_id = header_id if (header_id and len(items) == 1) else f"nats-{msg.seq}-{i}"
        decode_item(item, received, msg.seq, fallback_id, rows, bad)
    per_msg_events[msg.seq] = len(items)


def _iso(ts: datetime | str) -> str:
    return ts if isinstance(ts, str) else format_timestamp(ts)


def _take(rows: EventRows, keep: list[int]) -> EventRows:
    out = EventRows()
    for name in out.__dataclass_fields__:
        column = getattr(rows, name)
        setattr(out, name, [column[i] for i in keep])
    return out


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


def _one(cur: psycopg.Cursor) -> Any:
    """The single value of a one-row answer."""
    row = cur.fetchone()
    assert row is not None
    return row[0]


class MicroBatchWriter:
    """Validates and writes micro-batches for one catalog into one database (steps 2-4 above).

    ``validate``, ``insert_raw`` and ``aggregate_new`` are the steps a quarantine replay shares.
    """

    def __init__(self, catalog: Catalog, database_url: str, max_lateness: timedelta | None = None):
        self.catalog = catalog
        self.database_url = database_url
        self.max_lateness = max_lateness if max_lateness is not None else default_max_lateness()
        self._conn: psycopg.Connection | None = None

    def _too_late(self, rows: EventRows) -> dict[int, list[Failure]]:
        """Events older than the allowed lateness when received: quarantined as ``too_late``."""
        cutoffs: dict[datetime, tuple[datetime, str]] = {}
        late: dict[int, list[Failure]] = {}
        message = f"is more than {self.max_lateness.days} days before the event was received"
        for i, ts in enumerate(rows.timestamps):
            received = rows.received[i]
            if received not in cutoffs:
                cutoff = received - self.max_lateness
                cutoffs[received] = (cutoff, format_timestamp(cutoff))
            cutoff, cutoff_text = cutoffs[received]
            # Normalized timestamps compare as text (same format, UTC).
            if (ts < cutoff_text) if isinstance(ts, str) else (ts < cutoff):
                late[i] = [Failure("timestamp", "too_late", message)]
        return late

    def close(self) -> None:
        """Close the database connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def connection(self) -> psycopg.Connection:
        """The writer's database connection (opened on first use, autocommit off)."""
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url)
        return self._conn

    def retrying(self, transaction: Callable[[], T], what: str) -> T:
        """Run ``transaction`` (one PostgreSQL transaction), again when PostgreSQL rolled it back.

        Two writers upserting the same aggregate rows can deadlock; the loser's transaction is rolled
        back whole, so running it again is safe. A lost connection closes this writer's and raises.
        """
        for attempt in range(5):
            try:
                return transaction()
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                log.warning("%s rolled back by a deadlock; retrying (attempt %d)", what, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
            except psycopg.OperationalError:
                self.close()
                raise
        raise RuntimeError(f"{what} kept deadlocking; nothing of it was committed")

    def validate(self, rows: EventRows, bad: list[Rejected]) -> EventRows:
        """Step 2: split rows into the valid ones (returned) and failures (appended to ``bad``).

        Checks, with the writer's catalog: lateness (``too_late``), undeclared event types
        (``unknown_event_type``) and each event type's properties (pandera). The envelope was checked
        before (``decode_item``, or the gateway).
        """
        by_type: dict[str, list[int]] = defaultdict(list)
        for i, et in enumerate(rows.event_types):
            by_type[et].append(i)
        failed = self._too_late(rows)
        for et, idx in by_type.items():
            spec = self.catalog.event_types.get(et)
            if spec is None:
                if not self.catalog.accept_unknown_event_types:
                    reason = Failure(
                        "event_type",
                        "unknown_event_type",
                        f"event type {et!r} is not declared in events.yaml",
                    )
                    for i in idx:
                        failed.setdefault(i, []).append(reason)
                continue
            result = validate_event_type(
                spec,
                [rows.ids[i] for i in idx],
                [rows.customer_ids[i] for i in idx],
                [rows.properties[i] for i in idx],
            )
            for local, failures in result.items():
                failed.setdefault(idx[local], []).extend(failures)
        for i, failures in failed.items():
            bad.append(
                Rejected(
                    rows.ids[i],
                    rows.event_types[i],
                    rows.customer_ids[i],
                    rows.timestamps[i],
                    rows.received[i],
                    {
                        "id": rows.ids[i],
                        "event_type": rows.event_types[i],
                        "customer_id": rows.customer_ids[i],
                        "timestamp": _iso(rows.timestamps[i]),
                        "properties": rows.properties[i],
                        "metadata": rows.metadata[i],
                    },
                    None,
                    failures,
                    rows.seqs[i],
                )
            )
        return _take(rows, [i for i in range(len(rows.ids)) if i not in failed]) if failed else rows

    def write(self, messages: list[Message], run_id: str | None = None) -> BatchCounts:
        """Decode, validate and commit one micro-batch (steps 2-4); the caller acks afterwards."""
        if not messages:
            return BatchCounts()
        rows, bad = EventRows(), list[Rejected]()
        per_msg_events: dict[int, int] = {}
        for msg in messages:
            _decode_message(msg, rows, bad, per_msg_events)
        # Inside one batch the first occurrence of an id wins; the others are duplicates (3b).
        seen: set[str] = set()
        keep = []
        for i, event_id in enumerate(rows.ids):
            if event_id not in seen:
                seen.add(event_id)
                keep.append(i)
        if len(keep) != len(rows.ids):
            rows = _take(rows, keep)
        unique_bad = []
        for q in bad:
            if q.event_id is None or q.event_id not in seen:
                if q.event_id is not None:
                    seen.add(q.event_id)
                unique_bad.append(q)
        valid = self.validate(rows, unique_bad)
        # Nothing committed on a deadlock: the messages stay un-acked and are redelivered if it persists.
        return self.retrying(
            lambda: self._commit(messages, per_msg_events, valid, unique_bad, run_id), "micro-batch"
        )

    def insert_raw(
        self, cur: psycopg.Cursor, rows: EventRows, claimed: set[int] | None = None
    ) -> dict[int, int]:
        """Step 3b, inside the caller's transaction: insert ``rows`` into ``usage_events``.

        ``ON CONFLICT (id) DO NOTHING``: an id stored before, by any path, is not stored again. The
        rows newly stored are also left in the temporary table ``new_events`` until the commit, for
        ``aggregate_new``. Only rows of the ``claimed`` stream sequences are written when given.
        Returns the number of newly stored events per stream sequence.
        """
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS incoming (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        # Only what aggregation reads: copying metadata and times of every new row would cost more.
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_events (id text, event_type text, customer_id text,"
            " ts timestamptz, properties jsonb, stream_seq bigint) ON COMMIT DELETE ROWS"
        )
        with cur.copy(
            "COPY incoming (id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq)"
            " FROM STDIN"
        ) as copy:
            for i in range(len(rows.ids)):
                if claimed is None or rows.seqs[i] in claimed:
                    copy.write_row(
                        (
                            rows.ids[i],
                            rows.event_types[i],
                            rows.customer_ids[i],
                            rows.timestamps[i],
                            rows.received[i],
                            _json.encode(rows.properties[i]).decode(),
                            _json.encode(rows.metadata[i]).decode(),
                            rows.seqs[i],
                        )
                    )
        cur.execute(
            "WITH ins AS (INSERT INTO usage_events SELECT * FROM incoming ORDER BY id"
            " ON CONFLICT (id) DO NOTHING RETURNING id, event_type, customer_id, ts, properties, stream_seq)"
            " INSERT INTO new_events SELECT * FROM ins"
        )
        return dict(cur.execute("SELECT stream_seq, count(*) FROM new_events GROUP BY 1").fetchall())

    def aggregate_new(self, conn: psycopg.Connection) -> None:
        """Step 3d, inside the caller's transaction, after ``insert_raw``: aggregate the new rows only.

        With the *active* meter definitions, share-locked: a meter replay waits for this commit, or
        this transaction waits for the replay (see ``meter_platform.meters.aggregates``). A row not newly stored
        (a duplicate, a redelivery) is never aggregated, so nothing is counted twice.
        """
        cur = conn.cursor()
        types = {r[0] for r in cur.execute("SELECT DISTINCT event_type FROM new_events").fetchall()}
        if not types:
            return
        for meter in active_meters(conn, lock=True):
            if meter.event_type in types:
                cur.execute(*aggregate_upsert_sql(meter, "new_events"))

    def _commit(
        self,
        messages: list[Message],
        per_msg_events: dict[int, int],
        rows: EventRows,
        bad: list[Rejected],
        run_id: str | None,
    ) -> BatchCounts:
        conn = self.connection()
        seqs = sorted(m.seq for m in messages)
        subjects = {m.seq: m.subject for m in messages}
        counts = BatchCounts(messages=len(messages), batches=1)
        with conn.transaction():
            cur = conn.cursor()
            # 3a. Claim the messages; rows that already exist belong to an earlier commit.
            # One fetch comes from one stream incarnation.
            stream_created = messages[0].stream_created
            batch_id = _one(
                cur.execute(
                    "INSERT INTO ingest_batches (run_id, stream_created, first_seq, last_seq, messages, events, stored,"
                    " duplicates, quarantined) VALUES (%s, %s, %s, %s, 0, 0, 0, 0, 0) RETURNING batch_id",
                    (run_id, stream_created, seqs[0], seqs[-1]),
                )
            )
            claimed = {
                r[0]
                for r in cur.execute(
                    "INSERT INTO ingest_messages (stream_created, stream_seq, batch_id, subject, events, stored,"
                    " duplicates, quarantined) SELECT %s, s, %s, j, 0, 0, 0, 0"
                    " FROM unnest(%s::bigint[], %s::text[]) AS t(s, j)"
                    " ON CONFLICT (stream_created, stream_seq) DO NOTHING RETURNING stream_seq",
                    (stream_created, batch_id, seqs, [subjects[s] for s in seqs]),
                ).fetchall()
            }
            counts.redelivered = len(seqs) - len(claimed)
            if not claimed:
                cur.execute("DELETE FROM ingest_batches WHERE batch_id = %s", (batch_id,))
                counts.messages = 0
                return counts
            counts.messages = len(claimed)
            counts.first_seq, counts.last_seq = min(claimed), max(claimed)
            # 3b. Raw events, deduplicated by id against everything stored before.
            stored = self.insert_raw(cur, rows, claimed)
            # 3c. Quarantine, unless the id is stored already (then it is a duplicate).
            quarantined: dict[int, int] = {}
            todo = [q for q in bad if q.seq in claimed]
            if todo:
                cur.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS incoming_q (LIKE quarantined_events) ON COMMIT DELETE ROWS"
                )
                with cur.copy(
                    "COPY incoming_q (quarantine_id, event_id, event_type, customer_id, ts, received_at, payload,"
                    " payload_text, reasons, stream_seq, quarantined_at, status) FROM STDIN"
                ) as copy:
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
                                datetime.now().astimezone(),
                                "quarantined",
                            )
                        )
                quarantined = dict(
                    cur.execute(
                        "WITH ins AS (INSERT INTO quarantined_events (event_id, event_type, customer_id, ts, received_at,"
                        " payload, payload_text, reasons, stream_seq)"
                        " SELECT event_id, event_type, customer_id, ts, received_at, payload, payload_text, reasons,"
                        " stream_seq FROM incoming_q q WHERE q.event_id IS NULL OR NOT EXISTS"
                        " (SELECT 1 FROM usage_events u WHERE u.id = q.event_id) ORDER BY quarantine_id"
                        " ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING RETURNING stream_seq)"
                        " SELECT stream_seq, count(*) FROM ins GROUP BY 1"
                    ).fetchall()
                )
            # 3d. Aggregates from the newly stored rows only.
            if stored:
                self.aggregate_new(conn)
            # 3e. The ledger: per message and per batch, events = stored + duplicates + quarantined.
            ledger = []
            for seq in sorted(claimed):
                ev, st, qu = per_msg_events.get(seq, 0), stored.get(seq, 0), quarantined.get(seq, 0)
                ledger.append((seq, ev, st, ev - st - qu, qu))
                counts.events += ev
                counts.stored += st
                counts.quarantined += qu
            counts.duplicates = counts.events - counts.stored - counts.quarantined
            cur.execute(
                "UPDATE ingest_messages m SET events = t.e, stored = t.s, duplicates = t.d, quarantined = t.q"
                " FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[], %s::int[]) AS t(seq, e, s, d, q)"
                " WHERE m.stream_seq = t.seq AND m.stream_created = %s",
                [*(list(col) for col in zip(*ledger, strict=True)), stream_created],
            )
            cur.execute(
                "UPDATE ingest_batches SET first_seq = %s, last_seq = %s, messages = %s, events = %s, stored = %s,"
                " duplicates = %s, quarantined = %s WHERE batch_id = %s",
                (
                    counts.first_seq,
                    counts.last_seq,
                    counts.messages,
                    counts.events,
                    counts.stored,
                    counts.duplicates,
                    counts.quarantined,
                    batch_id,
                ),
            )
        # 4. Committed (leaving the `with` block commits the transaction).
        return counts


@dataclass
class DrainSettings:
    """How a run drains the stream."""

    batch_size: int = 500  # messages per fetch; a gateway message carries up to thousands of events
    fetch_timeout: float = 1.0  # seconds to wait for the first message of a batch
    max_seconds: float = 300.0  # the run's time budget: the next run picks up after it
    idle_seconds: float = 5.0  # stop after this long with nothing to fetch


def _to_message(msg: Any, stream_created: datetime) -> Message:
    meta = msg.metadata
    return Message(
        seq=meta.sequence.stream,
        subject=msg.subject,
        data=msg.data,
        headers=msg.headers,
        timestamp_us=datetime_to_us(meta.timestamp) if meta.timestamp else now_us(),
        stream_created=stream_created,
    )


async def drain(
    nats_url: str,
    database_url: str,
    catalog: Catalog,
    settings: DrainSettings | None = None,
    run_id: str | None = None,
    on_batch: Callable[[BatchCounts], None] | None = None,
    crash_after_commit: bool = False,
) -> BatchCounts:
    """Drain the durable consumer in micro-batches until idle or out of time; return the run's counts.

    ``crash_after_commit`` exists for the test that kills a run between commit and ack: it raises
    right after the first commit, leaving that batch's messages un-acked.
    """
    settings = settings or DrainSettings()
    total = BatchCounts()
    writer = MicroBatchWriter(catalog, database_url)
    nc = await connect(nats_url, name=f"meter-ingest-{run_id or 'local'}")
    try:
        js = nc.jetstream()
        await ensure_stream_and_consumer(js)
        stream_created = await stream_incarnation(js)
        sub = await js.pull_subscribe_bind(CONSUMER_NAME, STREAM_NAME)
        started = last_seen = time.monotonic()
        while time.monotonic() - started < settings.max_seconds:
            try:
                fetched = await sub.fetch(settings.batch_size, timeout=settings.fetch_timeout)
            except (NatsTimeoutError, TimeoutError):
                if time.monotonic() - last_seen >= settings.idle_seconds:
                    break
                continue
            if not fetched:  # nats-py can return an empty fetch on a stale pull status
                continue
            last_seen = time.monotonic()
            messages = [_to_message(m, stream_created) for m in fetched]
            # Steps 2-4, off the event loop so the NATS connection stays responsive.
            counts = await asyncio.to_thread(writer.write, messages, run_id)
            if crash_after_commit:
                raise RuntimeError("simulated crash between commit and ack")
            # 5. Only now, after the commit, ack. A crash before this line means redelivery, which
            # step 3a turns into a no-op.
            for m in fetched:
                await m.ack()
            await nc.flush()
            total.add(counts)
            if on_batch is not None:
                on_batch(counts)
        return total
    finally:
        writer.close()
        # close(), not drain(): every ack was flushed above, and what was fetched but not acked must
        # simply be left to redelivery.
        await nc.close()
