"""Quarantine replay: once the catalog is fixed, quarantined events go through the normal path again.

Events that fail validation are kept in ``quarantined_events`` with their reasons (never dropped).
Once the catalog is fixed (an enum value added, an event type declared, ``METER_MAX_LATENESS_DAYS``
raised), a **replay** re-validates them with the current catalog and counts those that now pass.

A replay, in this order:

1. **Opens its ledger row** in ``quarantine_replays`` (committed at once: filters, catalog, start time).
2. **Takes a chunk** of quarantined rows (``status = 'quarantined'``, matching the filters, in
   ``quarantine_id`` order after the previous chunk) ``FOR UPDATE SKIP LOCKED``: rows another replay
   holds are skipped, so two replays never take the same event, and a row is locked until its
   chunk commits.
3. **Re-validates** each payload exactly as ingestion does (``capture.messages.decode_item`` for the envelope
   and timestamp against the original receive time, then ``MicroBatchWriter.validate`` for lateness,
   event types and properties with the *current* catalog). A row without a payload (a message that
   was not JSON) cannot pass and stays quarantined.
4. **Writes, in one PostgreSQL transaction per chunk**:
   a. inserts the events that now pass, deduplicated by id in ``event_ids`` (``MicroBatchWriter.insert_raw``,
      the ingestion code): an id already stored, by any path, is a duplicate, not a second count (a
      day without its partition yet rolls the chunk back; the writer creates it and runs it again);
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import psycopg

from meter_platform.capture.messages import EventRows, Rejected, decode_item
from meter_platform.catalog import Catalog
from meter_platform.ingestion.quarantine import QuarantineFilter, reason_text
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.meters.aggregates import psycopg_bind
from meter_platform.storage import db


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
        rows = _take_chunk(cur, filters, after, chunk_size)
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
        _settle_outcomes(cur, candidates, by_id, new_ids)
        chunk = _count_chunk(candidates, replay_id, dry_run)
        if dry_run:
            raise psycopg.Rollback()  # leaves the `with`, rolled back: nothing written, locks released
        _write_chunk(cur, replay_id, candidates, chunk)
    # 5. Committed (or, for a dry run, rolled back).
    return chunk, rows[-1][0]


def _take_chunk(
    cur: psycopg.Cursor, filters: QuarantineFilter, after: int, chunk_size: int
) -> list[tuple[Any, ...]]:
    """Step 2: the next quarantined rows after ``after``, locked; rows another replay holds skipped."""
    params: dict[str, Any] = {"after": after, "limit": chunk_size}
    return cur.execute(
        "SELECT quarantine_id, event_id, payload, received_at, stream_seq, reasons FROM quarantined_events"
        f" WHERE {filters.where(params, psycopg_bind)} AND quarantine_id > %(after)s"
        " ORDER BY quarantine_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
        params,
    ).fetchall()


def _settle_outcomes(
    cur: psycopg.Cursor, candidates: list[_Candidate], by_id: dict[str, _Candidate], new_ids: set[str]
) -> None:
    """Each candidate's outcome: ``replayed`` (newly stored), ``duplicate`` (its id was stored
    already, also when it still fails) or ``quarantined``."""
    still = [c for c in candidates if c.outcome == "quarantined" and c.event_id not in by_id]
    stored_before = _stored_already(cur, [c.event_id for c in still if c.event_id is not None])
    for cand in candidates:
        if cand.event_id in by_id and by_id[cand.event_id] is cand:
            cand.outcome = "replayed" if cand.event_id in new_ids else "duplicate"
        elif cand.outcome == "quarantined" and cand.event_id in stored_before:
            cand.outcome = "duplicate"


def _count_chunk(candidates: list[_Candidate], replay_id: int | None, dry_run: bool) -> ReplaySummary:
    """The chunk's counts, and the reasons of the events still quarantined."""
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
    return chunk


def _write_chunk(
    cur: psycopg.Cursor, replay_id: int | None, candidates: list[_Candidate], chunk: ReplaySummary
) -> None:
    """4c: each row's new state; 4d: the replay's ledger row, in the same transaction."""
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


def _stored_already(cur: psycopg.Cursor, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    # event_ids is the dedup authority: it also knows the ids of events archived out of usage_events.
    return {r[0] for r in cur.execute("SELECT id FROM event_ids WHERE id = ANY(%s)", (ids,)).fetchall()}
