"""Quarantine you can work with: list quarantined events, and replay them through the normal path.

Events that fail validation are kept in ``quarantined_events`` with their reasons (never dropped).
Once the catalog is fixed (an enum value added, an event type declared, ``METER_MAX_LATENESS_DAYS``
raised), a **replay** re-validates them with the current catalog and counts those that now pass.

A replay, in this order:

1. **Opens its ledger row** in ``quarantine_replays`` (committed at once: filters, catalog, start time).
2. **Takes a chunk** of quarantined rows (``status = 'quarantined'``, matching the filters, in
   ``quarantine_id`` order after the previous chunk) ``FOR UPDATE SKIP LOCKED``: rows another replay
   holds are skipped, so two replays never take the same event, and a row is locked until its
   chunk commits.
3. **Re-validates** each payload exactly as ingestion does (``pipeline.decode_item`` for the envelope
   and timestamp against the original receive time, then ``MicroBatchWriter.validate`` for lateness,
   event types and properties with the *current* catalog). A row without a payload (a message that
   was not JSON) cannot pass and stays quarantined.
4. **Writes, in one PostgreSQL transaction per chunk**:
   a. inserts the events that now pass ``ON CONFLICT (id) DO NOTHING`` (``MicroBatchWriter.insert_raw``,
      the ingestion code): an id already stored, by any path, is a duplicate, not a second count;
   b. upserts the aggregates from the *newly stored* rows only (``MicroBatchWriter.aggregate_new``,
      with the active meter definitions, share-locked as ingestion does);
   c. marks the rows ``replayed`` (stored in a.) or ``duplicate`` (their id was stored already, also
      when they still fail, as ingestion counts a resend of a stored id), with the replay id and the
      time; refreshes ``reasons`` of those still failing;
   d. adds the chunk's counts to the replay's ledger row (``examined = stored + duplicates +
      still_quarantined``, a database CHECK).
5. **Commits**, then takes the next chunk; at the end records ``finished_at``.

Each row leaves ``quarantined`` at most once (2 + 4c in one transaction), and each id is stored at
most once (4a): a second replay, or one interrupted anywhere and run again, stores nothing twice.
``GET /v1/ingest/status`` keeps ``processed = stored + duplicates + quarantined``: a replayed event
moves from ``quarantined`` to ``stored`` (``replayed_from_quarantine``) or to ``duplicates``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg

from meter_platform.capture.envelope import format_timestamp, parse_timestamp
from meter_platform.meters.aggregates import Bind, psycopg_bind
from meter_platform.storage import db

if TYPE_CHECKING:
    from meter_platform.catalog import Catalog
    from meter_platform.ingestion.writer import EventRows, MicroBatchWriter, Rejected

#: The states of a quarantined event.
STATUSES = ("quarantined", "replayed", "duplicate")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_REASON_RE = re.compile(r"^[a-z_]{1,64}$")
_LIST_PARAMS = ("reason", "event_type", "customer_id", "from", "to", "status", "limit", "offset")


#: The ledger's totals in one snapshot (no parameters; runs through psycopg or SQLAlchemy alike).
LEDGER_TOTALS_SQL = (
    "SELECT coalesce(sum(events), 0) AS events, coalesce(sum(stored), 0) AS stored,"
    " coalesce(sum(duplicates), 0) AS duplicates, coalesce(sum(quarantined), 0) AS quarantined,"
    " coalesce(sum(messages), 0) AS messages, max(committed_at) AS last_commit,"
    " (SELECT count(*) FROM quarantined_events WHERE status = 'replayed') AS replayed,"
    " (SELECT count(*) FROM quarantined_events WHERE status = 'duplicate') AS replay_duplicates,"
    " (SELECT count(*) FROM quarantine_replays) AS replays,"
    " (SELECT max(finished_at) FROM quarantine_replays) AS last_replay FROM ingest_batches"
)


@dataclass(frozen=True)
class LedgerTotals:
    """What happened to every event taken from JetStream, counting moves out of quarantine.

    A replayed event moves from ``quarantined`` to ``stored`` (or ``duplicates``): ``processed``
    is unchanged and stays ``stored + duplicates + quarantined``.
    """

    processed: int
    stored: int
    duplicates: int
    quarantined: int
    replayed: int
    replay_duplicates: int
    messages: int
    replays: int
    last_commit: datetime | None
    last_replay: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> LedgerTotals:
        """From a row of :data:`LEDGER_TOTALS_SQL` (a tuple in its column order)."""
        events, stored, dups, quar, messages, last_commit, replayed, replay_dups, replays, last_replay = row
        replayed, replay_dups = int(replayed), int(replay_dups)
        return cls(
            processed=int(events),
            stored=int(stored) + replayed,
            duplicates=int(dups) + replay_dups,
            quarantined=int(quar) - replayed - replay_dups,
            replayed=replayed,
            replay_duplicates=replay_dups,
            messages=int(messages),
            replays=int(replays),
            last_commit=last_commit,
            last_replay=last_replay,
        )

    @property
    def balanced(self) -> bool:
        """Every processed event is stored, a duplicate or quarantined."""
        return self.processed == self.stored + self.duplicates + self.quarantined


class QuarantineQueryError(ValueError):
    """The request's parameters are not usable; ``details`` lists each problem (a 400)."""

    def __init__(self, details: list[dict[str, str]]):
        super().__init__(
            f"{len(details)} query parameter(s) are invalid: "
            + "; ".join(f"{d['field']} {d['message']}" for d in details)
        )
        self.details = details


@dataclass(frozen=True)
class QuarantineFilter:
    """Which quarantined events: any of ``reasons``, an event type, a customer, a quarantine time range
    ``[start, end)`` and a status (None: any status)."""

    reasons: tuple[str, ...] = ()
    event_type: str | None = None
    customer_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    status: str | None = "quarantined"

    def where(self, params: dict[str, Any], bind: Bind) -> str:
        """The SQL condition over ``quarantined_events`` (placeholders in ``bind``'s style)."""
        where = ["TRUE"]
        if self.status is not None:
            params["q_status"] = self.status
            where.append(f"status = {bind('q_status')}")
        if self.reasons:
            any_of = []
            for i, reason in enumerate(self.reasons):
                params[f"q_reason{i}"] = json.dumps([{"reason": reason}])
                any_of.append(f"reasons @> CAST({bind(f'q_reason{i}')} AS jsonb)")
            where.append(f"({' OR '.join(any_of)})")
        if self.event_type is not None:
            params["q_event_type"] = self.event_type
            where.append(f"event_type = {bind('q_event_type')}")
        if self.customer_id is not None:
            params["q_customer"] = self.customer_id
            where.append(f"customer_id = {bind('q_customer')}")
        if self.start is not None:
            params["q_start"] = self.start
            where.append(f"quarantined_at >= {bind('q_start')}")
        if self.end is not None:
            params["q_end"] = self.end
            where.append(f"quarantined_at < {bind('q_end')}")
        return " AND ".join(where)

    def as_json(self) -> dict[str, Any]:
        """The filters that are set, as recorded in ``quarantine_replays.filters``."""
        out: dict[str, Any] = {}
        if self.reasons:
            out["reason"] = list(self.reasons)
        for name in ("event_type", "customer_id", "status"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.start is not None:
            out["from"] = format_timestamp(self.start)
        if self.end is not None:
            out["to"] = format_timestamp(self.end)
        return out


def parse_reasons(values: Iterable[str]) -> tuple[str, ...]:
    """Reason codes from repeated and/or comma-separated values; ValueError for a malformed one."""
    out: list[str] = []
    for value in values:
        for reason in (r.strip() for r in value.split(",")):
            if not reason:
                continue
            if not _REASON_RE.match(reason):
                raise ValueError(f"{reason!r} is not a reason code (e.g. enum, type, unknown_event_type)")
            if reason not in out:
                out.append(reason)
    return tuple(out)


def parse_list_params(items: Iterable[tuple[str, str]]) -> tuple[QuarantineFilter, int, int]:
    """Check the query parameters of ``GET /v1/quarantine``: (filters, limit, offset).

    Raises :class:`QuarantineQueryError` listing every bad parameter.
    """
    errors: list[dict[str, str]] = []
    values: dict[str, str] = {}
    reason_values: list[str] = []
    for name, value in items:
        if name not in _LIST_PARAMS:
            errors.append({"field": name, "message": f"is not a parameter; use {', '.join(_LIST_PARAMS)}"})
        elif "\x00" in value:
            errors.append({"field": name, "message": "must not contain the NUL character"})
        elif name == "reason":
            reason_values.append(value)
        elif name in values:
            errors.append({"field": name, "message": "is given more than once"})
        else:
            values[name] = value
    reasons: tuple[str, ...] = ()
    try:
        reasons = parse_reasons(reason_values)
    except ValueError as exc:
        errors.append({"field": "reason", "message": str(exc)})
    times: dict[str, datetime | None] = {"from": None, "to": None}
    for name in times:
        if values.get(name):
            try:
                times[name] = parse_timestamp(values[name])
            except ValueError as exc:
                errors.append({"field": name, "message": str(exc)})
    start, end = times["from"], times["to"]
    if start is not None and end is not None and start >= end:
        errors.append({"field": "from", "message": "must be before `to` (the range is [from, to))"})
    status: str | None = values.get("status") or "quarantined"
    if status == "all":
        status = None
    elif status not in STATUSES:
        errors.append({"field": "status", "message": f"must be one of {', '.join(STATUSES)} or all"})
    numbers = {"limit": DEFAULT_LIMIT, "offset": 0}
    for name in numbers:
        raw = values.get(name)
        if raw:
            if not raw.isdigit():
                errors.append({"field": name, "message": "must be a non-negative integer"})
            else:
                numbers[name] = int(raw)
    if not 1 <= numbers["limit"] <= MAX_LIMIT:
        errors.append({"field": "limit", "message": f"must be 1 to {MAX_LIMIT}"})
    if errors:
        raise QuarantineQueryError(errors)
    filters = QuarantineFilter(
        reasons=reasons,
        event_type=values.get("event_type") or None,
        customer_id=values.get("customer_id") or None,
        start=start,
        end=end,
        status=status,
    )
    return filters, numbers["limit"], numbers["offset"]


def list_sql(filters: QuarantineFilter, limit: int, offset: int, bind: Bind) -> tuple[str, dict[str, Any]]:
    """The page of quarantined events, newest first (one row more than ``limit``: is there a next page)."""
    params: dict[str, Any] = {"q_limit": limit + 1, "q_offset": offset}
    sql = (
        "SELECT quarantine_id, event_id, event_type, customer_id, ts, received_at, quarantined_at, reasons,"
        " payload, payload_text, status, stream_seq, replay_id, resolved_at FROM quarantined_events"
        f" WHERE {filters.where(params, bind)}"
        f" ORDER BY quarantined_at DESC, quarantine_id DESC LIMIT {bind('q_limit')} OFFSET {bind('q_offset')}"
    )
    return sql, params


def _time(value: datetime | None) -> str | None:
    return format_timestamp(value) if value is not None else None


def row_json(row: Any) -> dict[str, Any]:
    """One quarantined event as ``GET /v1/quarantine`` shows it."""
    payload = row.payload
    timestamp = _time(row.ts)
    if timestamp is None and isinstance(payload, dict) and isinstance(payload.get("timestamp"), str):
        timestamp = payload["timestamp"]
    return {
        "quarantine_id": row.quarantine_id,
        "id": row.event_id,
        "event_type": row.event_type,
        "customer_id": row.customer_id,
        "timestamp": timestamp,
        "received_at": _time(row.received_at),
        "quarantined_at": _time(row.quarantined_at),
        "reasons": row.reasons,
        "payload": payload,
        "payload_text": row.payload_text,
        "status": row.status,
        "stream_seq": row.stream_seq,
        "replay_id": row.replay_id,
        "resolved_at": _time(row.resolved_at),
    }


def list_answer(rows: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """The JSON answer of ``GET /v1/quarantine`` for the rows of :func:`list_sql`."""
    answer: dict[str, Any] = {"data": [row_json(r) for r in rows[:limit]]}
    if len(rows) > limit:
        answer["next_offset"] = offset + limit
    return answer


def reason_text(reason: dict[str, Any]) -> str:
    """A stored reason as one readable phrase: ``field: message``."""
    field_name, message = reason.get("field") or "", reason.get("message") or reason.get("reason") or ""
    return f"{field_name}: {message}" if field_name else str(message)


# --- replay --------------------------------------------------------------------------------------------


@dataclass
class ReplaySummary:
    """What a replay did (or, with ``dry_run``, would do)."""

    replay_id: int | None = None
    dry_run: bool = False
    examined: int = 0
    stored: int = 0
    duplicates: int = 0
    still_quarantined: int = 0
    chunks: int = 0
    #: ``field: message`` of the events still quarantined, with how many events carry it
    still_reasons: Counter[str] = field(default_factory=Counter)

    def add(self, other: ReplaySummary) -> None:
        """Fold a chunk's counts into these."""
        self.examined += other.examined
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.still_quarantined += other.still_quarantined
        self.chunks += other.chunks
        self.still_reasons.update(other.still_reasons)

    @property
    def balanced(self) -> bool:
        """Every examined event was stored, recognised as a duplicate or is still quarantined."""
        return self.examined == self.stored + self.duplicates + self.still_quarantined


@dataclass
class _Candidate:
    quarantine_id: int
    event_id: str | None
    reasons: list[dict[str, Any]]  # as stored; replaced by the new ones when it still fails
    new_reasons: list[dict[str, Any]] | None = None
    outcome: str = "quarantined"  # quarantined | replayed | duplicate


def count_quarantined(database_url: str, filters: QuarantineFilter | None = None) -> int:
    """How many quarantined events match (what a replay would examine)."""
    filters = _replay_filter(filters)
    params: dict[str, Any] = {}
    with db.connect(database_url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM quarantined_events WHERE {filters.where(params, psycopg_bind)}", params
        ).fetchone()
    return int(row[0]) if row else 0


def _replay_filter(filters: QuarantineFilter | None) -> QuarantineFilter:
    f = filters or QuarantineFilter()
    # Only events still in quarantine are replayed; the others were counted already.
    return QuarantineFilter(f.reasons, f.event_type, f.customer_id, f.start, f.end, "quarantined")


def replay_quarantine(
    database_url: str,
    catalog: Catalog,
    filters: QuarantineFilter | None = None,
    *,
    dry_run: bool = False,
    chunk_size: int = 500,
    max_lateness: timedelta | None = None,
    on_chunk: Callable[[ReplaySummary], None] | None = None,
) -> ReplaySummary:
    """Re-validate quarantined events with ``catalog`` and count those that now pass (see module doc).

    ``dry_run`` runs the same selection and validation and reports what would move, writing nothing.
    ``on_chunk`` receives each committed chunk's counts (for a progress bar).
    """
    from meter_platform.ingestion.writer import MicroBatchWriter

    filters = _replay_filter(filters)
    writer = MicroBatchWriter(catalog, database_url, max_lateness)
    summary = ReplaySummary(dry_run=dry_run)
    try:
        conn = writer.connection()
        if not dry_run:
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO quarantine_replays (filters, catalog_dir) VALUES (%s, %s) RETURNING replay_id",
                    (
                        json.dumps(filters.as_json()),
                        str(catalog.directory) if catalog.directory is not None else None,
                    ),
                ).fetchone()
            assert row is not None
            summary.replay_id = int(row[0])
        after = 0
        while True:
            chunk, last = writer.retrying(
                partial(_replay_chunk, writer, summary.replay_id, filters, after, chunk_size, dry_run),
                "quarantine replay chunk",
            )
            if last is None:
                break
            after = last
            summary.add(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        if summary.replay_id is not None:
            with conn.transaction():
                conn.execute(
                    "UPDATE quarantine_replays SET finished_at = now() WHERE replay_id = %s",
                    (summary.replay_id,),
                )
        return summary
    finally:
        writer.close()


def _revalidate(
    writer: MicroBatchWriter, rows: list[tuple[Any, ...]]
) -> tuple[list[_Candidate], EventRows, dict[str, _Candidate]]:
    """Step 3: (every candidate, the events that pass, candidate by event id)."""
    from meter_platform.ingestion.writer import EventRows, decode_item

    candidates: list[_Candidate] = []
    events = EventRows()
    by_id: dict[str, _Candidate] = {}
    bad: list[Rejected] = []
    for quarantine_id, event_id, payload, received, seq, reasons in rows:
        cand = _Candidate(quarantine_id, event_id, reasons)
        candidates.append(cand)
        if payload is None:
            continue  # not JSON when received: nothing to re-validate, it stays as it is
        item = payload
        if isinstance(item, dict) and event_id is not None and "id" not in item:
            item = {**item, "id": event_id}  # the id ingestion gave it (header or fallback)
        n_bad = len(bad)
        if decode_item(item, received, seq, event_id or f"quarantine-{quarantine_id}", events, bad):
            new_id = events.ids[-1]
            if new_id in by_id:  # the same id twice in one chunk: the first one counts
                _drop_last(events)
                cand.outcome = "duplicate"
            else:
                cand.event_id = new_id
                by_id[new_id] = cand
        elif len(bad) > n_bad:
            cand.new_reasons = [f.as_json() for f in bad[-1].reasons]
    failed: list[Rejected] = []
    valid = writer.validate(events, failed)
    for rejected in failed:
        assert rejected.event_id is not None
        by_id.pop(rejected.event_id).new_reasons = [f.as_json() for f in rejected.reasons]
    return candidates, valid, by_id


def _drop_last(events: EventRows) -> None:
    for column in (
        events.ids,
        events.event_types,
        events.customer_ids,
        events.timestamps,
        events.received,
        events.properties,
        events.metadata,
        events.seqs,
    ):
        column.pop()


def _replay_chunk(
    writer: MicroBatchWriter,
    replay_id: int | None,
    filters: QuarantineFilter,
    after: int,
    chunk_size: int,
    dry_run: bool,
) -> tuple[ReplaySummary, int | None]:
    """Steps 2-5 for one chunk: its counts, and the last quarantine_id taken (None: nothing left)."""
    conn = writer.connection()
    with conn.transaction():
        cur = conn.cursor()
        params: dict[str, Any] = {"after": after, "limit": chunk_size}
        rows = cur.execute(
            "SELECT quarantine_id, event_id, payload, received_at, stream_seq, reasons FROM quarantined_events"
            f" WHERE {filters.where(params, psycopg_bind)} AND quarantine_id > %(after)s"
            " ORDER BY quarantine_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
            params,
        ).fetchall()
        if not rows:
            return ReplaySummary(), None
        candidates, valid, by_id = _revalidate(writer, rows)
        if dry_run:
            new_ids = set(valid.ids) - _stored_already(cur, valid.ids)
        else:
            # 4a-b: the ingestion steps, on the events that now pass.
            writer.insert_raw(cur, valid)
            new_ids = {r[0] for r in cur.execute("SELECT id FROM new_events").fetchall()}
            writer.aggregate_new(conn)
        still = [c for c in candidates if c.outcome == "quarantined" and c.event_id not in by_id]
        stored_before = _stored_already(cur, [c.event_id for c in still if c.event_id is not None])
        for cand in candidates:
            if cand.event_id in by_id and by_id[cand.event_id] is cand:
                cand.outcome = "replayed" if cand.event_id in new_ids else "duplicate"
            elif cand.outcome == "quarantined" and cand.event_id in stored_before:
                cand.outcome = "duplicate"
        chunk = ReplaySummary(replay_id=replay_id, dry_run=dry_run, chunks=1, examined=len(candidates))
        for cand in candidates:
            if cand.outcome == "replayed":
                chunk.stored += 1
            elif cand.outcome == "duplicate":
                chunk.duplicates += 1
            else:
                chunk.still_quarantined += 1
                for reason in cand.new_reasons if cand.new_reasons is not None else cand.reasons:
                    chunk.still_reasons[reason_text(reason)] += 1
        if dry_run:
            raise psycopg.Rollback()  # leaves the `with`, rolled back: nothing written, locks released
        # 4c: each row's new state; 4d: the replay's ledger row, in the same transaction.
        cur.execute(
            "UPDATE quarantined_events q SET status = t.status, replay_id = %s,"
            " reasons = coalesce(CAST(t.reasons AS jsonb), q.reasons),"
            " resolved_at = CASE WHEN t.status = 'quarantined' THEN NULL ELSE now() END"
            " FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS t(qid, status, reasons)"
            " WHERE q.quarantine_id = t.qid",
            (
                replay_id,
                [c.quarantine_id for c in candidates],
                [c.outcome for c in candidates],
                [
                    json.dumps(c.new_reasons)
                    if c.new_reasons is not None and c.outcome == "quarantined"
                    else None
                    for c in candidates
                ],
            ),
        )
        cur.execute(
            "UPDATE quarantine_replays SET examined = examined + %s, stored = stored + %s,"
            " duplicates = duplicates + %s, still_quarantined = still_quarantined + %s WHERE replay_id = %s",
            (chunk.examined, chunk.stored, chunk.duplicates, chunk.still_quarantined, replay_id),
        )
    # 5. Committed (or, for a dry run, rolled back).
    return chunk, rows[-1][0]


def _stored_already(cur: psycopg.Cursor, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    return {r[0] for r in cur.execute("SELECT id FROM usage_events WHERE id = ANY(%s)", (ids,)).fetchall()}
