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
   b. claim each event's id in ``event_ids`` (``ON CONFLICT (id) DO NOTHING``) and store in
      ``usage_events`` (partitioned by day) only the events whose id was claimed here: an id already
      stored is a duplicate, however it arrived (a resend, another path, a redelivery, months later,
      with another timestamp); a concurrent writer with the same id waits on the key, then sees it;
   c. quarantine what failed validation, with reasons (never dropped);
   d. upsert per-minute aggregates and their hourly and daily rollups (one statement per meter) from
      the rows *newly inserted in b.* only, so a duplicate or a redelivery can never be counted twice;
   e. record per-message and per-batch counts, ``events = stored + duplicates + quarantined``.
4. **Commit.** Everything in 3 becomes visible at once, or nothing does. (The day partitions the
   batch's events need are created before 3, each in its own short transaction: creating one locks
   the whole ``usage_events`` table, see :mod:`meter_platform.storage.partitions`.)
5. **Then ack** the messages. A crash between 4 and 5 means redelivery, and 3a makes that a no-op:
   at-least-once delivery from JetStream + idempotent writes = each event counted exactly once.

Steps 2, 3b and 3d are methods of :class:`MicroBatchWriter` (``validate``, ``insert_raw``,
``aggregate_new``) that a quarantine replay (``meter_platform.ingestion.quarantine``) runs too, on events taken
back out of ``quarantined_events``: an event replayed from quarantine is validated, deduplicated and
aggregated by exactly the code that ingests it from JetStream.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import postgres
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format

from meter_platform.capture.envelope import format_timestamp, parse_timestamp
from meter_platform.capture.messages import EventRows, Failure, Message, Rejected, decode_message
from meter_platform.catalog import Catalog
from meter_platform.config import load_ingestion_settings
from meter_platform.ingestion import ledger, rejects
from meter_platform.ingestion.counts import BatchCounts
from meter_platform.ingestion.timing import StageClock
from meter_platform.ingestion.validation import validate_event_type
from meter_platform.meters.aggregates import active_meters, aggregate_upsert_sql
from meter_platform.storage import db, partitions

log = logging.getLogger(__name__)


_json = msgspec.json.Encoder()
T = TypeVar("T")

# The batch's rows, emptied at each commit: COPY writes them here, the rows whose id was already stored
# are deleted once the others are in usage_events, and what is left is what ``aggregate_new`` reads.
_TEMP_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS new_events (id text, event_type text, customer_id text, ts timestamptz,"
    " received_at timestamptz, properties jsonb, metadata jsonb, stream_seq bigint) ON COMMIT DELETE ROWS"
)
_COPY = (
    "COPY new_events (id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq)"
    " FROM STDIN (FORMAT BINARY)"
)
_COPY_TYPES = ["text", "text", "text", "timestamptz", "timestamptz", "jsonb", "jsonb", "int8"]
# Step 3b in one statement: claim the ids, store the rows claimed, drop the others from new_events,
# count the stored per stream sequence. Ids are claimed in id order (the same lock order in every
# writer) and stored in id order (neighbouring keys of the id index are written together).
_STORE = """
WITH claimed AS (
    INSERT INTO event_ids (id, ts) SELECT id, ts FROM new_events ORDER BY id
    ON CONFLICT (id) DO NOTHING RETURNING id
), stored AS (
    INSERT INTO usage_events (id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq)
    SELECT n.id, n.event_type, n.customer_id, n.ts, n.received_at, n.properties, n.metadata, n.stream_seq
    FROM new_events n JOIN claimed c ON c.id = n.id ORDER BY n.id
    RETURNING stream_seq
), duplicates AS (
    DELETE FROM new_events n WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = n.id)
)
SELECT stream_seq, count(*) FROM stored GROUP BY 1
"""


class _JsonbFromText(Dumper):
    """Binary COPY of jsonb from JSON already encoded (msgspec's bytes): the format's version byte, then
    the text. PostgreSQL parses it as it would the text format; the client is spared psycopg's own
    encoding and text escaping, a third of the drain's time in this step."""

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> Buffer:
        return b"\x01" + obj


def _as_datetime(ts: datetime | str) -> datetime:
    """An event time for binary COPY: the gateway's canonical text (UTC, ``Z``) read directly."""
    if isinstance(ts, datetime):
        return ts
    if len(ts) == 27 and ts[26] == "Z":
        return datetime.fromisoformat(ts)
    return parse_timestamp(ts)


def _iso(ts: datetime | str) -> str:
    return ts if isinstance(ts, str) else format_timestamp(ts)


def _take(rows: EventRows, keep: list[int]) -> EventRows:
    out = EventRows()
    for name in out.__dataclass_fields__:
        column = getattr(rows, name)
        setattr(out, name, [column[i] for i in keep])
    return out


class MicroBatchWriter:
    """Validates and writes micro-batches for one catalog into one database (steps 2-4 above).

    ``validate``, ``insert_raw`` and ``aggregate_new`` are the steps a quarantine replay shares.
    """

    def __init__(self, catalog: Catalog, database_url: str, max_lateness: timedelta | None = None):
        self.catalog = catalog
        self.database_url = database_url
        self.max_lateness = (
            max_lateness if max_lateness is not None else load_ingestion_settings().max_lateness
        )
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
        back whole, so running it again is safe. So is a transaction that found a day without its
        partition (:class:`~meter_platform.storage.partitions.MissingDayPartitions`): the day is
        created outside it, then it runs again. A lost connection closes this writer's and raises.
        """
        for attempt in range(5):
            try:
                return transaction()
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                log.warning("%s rolled back by a deadlock; retrying (attempt %d)", what, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
            except partitions.MissingDayPartitions as exc:
                # Rolled back before writing a row: create the days, now outside the transaction.
                partitions.ensure_day_partitions(self.connection(), exc.days)
            except psycopg.errors.CheckViolation as exc:
                if "no partition" not in str(exc):
                    raise
                # A partition this process knew was dropped (archived): look again, then retry.
                log.warning("%s found no partition for a row (%s); retrying", what, exc)
                partitions.forget_partitions(self.connection())
            except psycopg.OperationalError:
                self.close()
                raise
        raise RuntimeError(
            f"{what} kept failing (deadlocks or missing partitions); nothing of it was committed"
        )

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
                    event_id=rows.ids[i],
                    event_type=rows.event_types[i],
                    customer_id=rows.customer_ids[i],
                    ts=rows.timestamps[i],
                    received=rows.received[i],
                    payload={
                        "id": rows.ids[i],
                        "event_type": rows.event_types[i],
                        "customer_id": rows.customer_ids[i],
                        "timestamp": _iso(rows.timestamps[i]),
                        "properties": rows.properties[i],
                        "metadata": rows.metadata[i],
                    },
                    reasons=failures,
                    seq=rows.seqs[i],
                )
            )
        return _take(rows, [i for i in range(len(rows.ids)) if i not in failed]) if failed else rows

    def write(self, messages: list[Message], run_id: str | None = None) -> BatchCounts:
        """Decode, validate and commit one micro-batch (steps 2-4); the caller acks afterwards."""
        if not messages:
            return BatchCounts()
        clock = StageClock()
        rows, bad = EventRows(), list[Rejected]()
        per_msg_events: dict[int, int] = {}
        for msg in messages:
            decode_message(msg, rows, bad, per_msg_events)
        clock.lap("decode")
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
        clock.lap("validate")
        self.ensure_partitions(valid.timestamps)
        clock.lap("insert")  # part of storing the rows; a set lookup unless a day is new
        # Nothing committed on a deadlock: the messages stay un-acked and are redelivered if it persists.
        counts = self.retrying(
            lambda: self._commit(messages, per_msg_events, valid, unique_bad, run_id, clock), "micro-batch"
        )
        counts.stages = clock.seconds
        return counts

    def ensure_partitions(self, timestamps: Iterable[datetime | str]) -> None:
        """Before the batch transaction: the day partitions of these event times, and of today and
        tomorrow (UTC) so that midnight finds its partition ready. Known days cost a set lookup."""
        today = datetime.now(UTC).date()
        days = partitions.days_of(timestamps) | {today, today + timedelta(days=1)}
        partitions.ensure_day_partitions(self.connection(), days)

    def insert_raw(
        self, cur: psycopg.Cursor, rows: EventRows, claimed: set[int] | None = None
    ) -> dict[int, int]:
        """Step 3b, inside the caller's transaction: store ``rows`` whose ids were never stored.

        Each id is claimed in ``event_ids`` (``ON CONFLICT (id) DO NOTHING``, in id order so that two
        writers lock keys in the same order); only the rows whose id this statement claimed go to
        ``usage_events``: an id stored before, by any path and with any timestamp, is not stored again,
        and of two concurrent writers holding the same id exactly one stores it (the other waits on the
        key, then sees the conflict). The rows newly stored are also left in the temporary table
        ``new_events`` until the commit, for ``aggregate_new`` (so it is called once per transaction).
        Only rows of the ``claimed`` stream sequences are written when given; of an id given twice,
        the first row counts. The rows go in by binary COPY (see :class:`_JsonbFromText`). Raises
        :class:`~meter_platform.storage.partitions.MissingDayPartitions` (before writing anything)
        when a row's day has no partition yet. Returns the number of newly stored events per stream
        sequence.
        """
        n = len(rows.ids)
        take = list(range(n)) if claimed is None else [i for i in range(n) if rows.seqs[i] in claimed]
        missing = partitions.missing_days(
            cur.connection, partitions.days_of(rows.timestamps[i] for i in take)
        )
        if missing:
            raise partitions.MissingDayPartitions(missing)
        if len(take) != n or len(set(rows.ids)) != n:
            seen: set[str] = set()
            keep = []
            for i in take:
                if rows.ids[i] not in seen:
                    seen.add(rows.ids[i])
                    keep.append(i)
            rows = _take(rows, keep)
        cur.execute(_TEMP_TABLE)
        copying = cur.connection.cursor()
        copying.adapters.register_dumper(bytes, _JsonbFromText)
        encode = _json.encode
        with copying.copy(_COPY) as copy:
            copy.set_types(_COPY_TYPES)
            write = copy.write_row
            for row in zip(
                rows.ids,
                rows.event_types,
                rows.customer_ids,
                [_as_datetime(ts) for ts in rows.timestamps],
                rows.received,
                [encode(p) for p in rows.properties],
                [encode(m) for m in rows.metadata],
                rows.seqs,
                strict=True,
            ):
                write(row)
        return dict(cur.execute(_STORE).fetchall())

    def aggregate_new(self, conn: psycopg.Connection) -> None:
        """Step 3d, inside the caller's transaction, after ``insert_raw``: aggregate the new rows only.

        With the *active* meter definitions, share-locked: a meter replay waits for this commit, or
        this transaction waits for the replay (see ``meter_platform.meters.aggregates``). A row not newly stored
        (a duplicate, a redelivery) is never aggregated, so nothing is counted twice. Each meter's upsert
        writes its minutes and their UTC hour and day rollups in one statement, from the same rows.
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
        clock: StageClock,
    ) -> BatchCounts:
        conn = self.connection()
        counts = BatchCounts(messages=len(messages), batches=1)
        with conn.transaction():
            cur = conn.cursor()
            # 3a. Claim the messages; those already in the ledger belong to an earlier commit.
            batch_id, claimed = ledger.claim(cur, messages, run_id)
            clock.lap("claim")
            counts.redelivered = len(messages) - len(claimed)
            if not claimed:
                ledger.drop_batch(cur, batch_id)
                counts.messages = 0
                return counts
            # 3b. Raw events, deduplicated by id against everything stored before.
            stored = self.insert_raw(cur, rows, claimed)
            clock.lap("insert")
            # 3c. Quarantine, unless the id is stored already (then it is a duplicate).
            quarantined = self.quarantine(cur, [q for q in bad if q.seq in claimed])
            clock.lap("quarantine")
            # 3d. Aggregates from the newly stored rows only.
            if stored:
                self.aggregate_new(conn)
            clock.lap("aggregate")
            # 3e. The ledger: per message and per batch, events = stored + duplicates + quarantined.
            counts.messages = len(claimed)
            counts.first_seq, counts.last_seq = min(claimed), max(claimed)
            per_message = ledger.per_message(sorted(claimed), per_msg_events, stored, quarantined)
            for _, events, st, _, qu in per_message:
                counts.events += events
                counts.stored += st
                counts.quarantined += qu
            counts.duplicates = counts.events - counts.stored - counts.quarantined
            ledger.record(cur, batch_id, messages[0].stream_created, per_message, counts)
            clock.lap("ledger")
        # 4. Committed (leaving the `with` block commits the transaction).
        clock.lap("commit")
        return counts

    def quarantine(self, cur: psycopg.Cursor, todo: list[Rejected]) -> dict[int, int]:
        """Step 3c, inside the caller's transaction (see :func:`rejects.quarantine_rejected`)."""
        return rejects.quarantine_rejected(cur, todo)
