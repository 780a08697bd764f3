"""The ingest ledger: every JetStream message the pipeline committed, with what became of its events.

``ingest_messages`` holds one row per message (keyed by the stream's creation time and the stream
sequence, since a re-created stream restarts at 1) and ``ingest_batches`` one per micro-batch; a
database CHECK holds ``events = stored + duplicates + quarantined`` on both. Claiming a message is
step 3a of the micro-batch, recording its counts step 3e (see :mod:`meter_platform.ingestion.writer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from meter_platform.capture.messages import Message

if TYPE_CHECKING:
    from meter_platform.ingestion.counts import BatchCounts


def claim(cur: psycopg.Cursor, messages: list[Message], run_id: str | None) -> tuple[int, set[int]]:
    """Open a batch and claim its messages; return the batch id and the sequences newly claimed.

    A sequence already in the ledger was committed before (a redelivery after a crash between commit
    and ack, or a second run holding the same message): it is not claimed, so it adds nothing.
    """
    seqs = sorted(m.seq for m in messages)
    subjects = {m.seq: m.subject for m in messages}
    stream_created = messages[0].stream_created  # one fetch comes from one stream incarnation
    row = cur.execute(
        "INSERT INTO ingest_batches (run_id, stream_created, first_seq, last_seq, messages, events, stored,"
        " duplicates, quarantined) VALUES (%s, %s, %s, %s, 0, 0, 0, 0, 0) RETURNING batch_id",
        (run_id, stream_created, seqs[0], seqs[-1]),
    ).fetchone()
    assert row is not None
    claimed = {
        r[0]
        for r in cur.execute(
            "INSERT INTO ingest_messages (stream_created, stream_seq, batch_id, subject, events, stored,"
            " duplicates, quarantined) SELECT %s, s, %s, j, 0, 0, 0, 0"
            " FROM unnest(%s::bigint[], %s::text[]) AS t(s, j)"
            " ON CONFLICT (stream_created, stream_seq) DO NOTHING RETURNING stream_seq",
            (stream_created, row[0], seqs, [subjects[s] for s in seqs]),
        ).fetchall()
    }
    return row[0], claimed


def drop_batch(cur: psycopg.Cursor, batch_id: int) -> None:
    """Forget a batch that claimed nothing (every message was committed before)."""
    cur.execute("DELETE FROM ingest_batches WHERE batch_id = %s", (batch_id,))


def per_message(
    seqs: list[int], events: dict[int, int], stored: dict[int, int], quarantined: dict[int, int]
) -> list[tuple[int, int, int, int, int]]:
    """(seq, events, stored, duplicates, quarantined) per message: what is not stored or quarantined
    is a duplicate."""
    out = []
    for seq in seqs:
        ev, st, qu = events.get(seq, 0), stored.get(seq, 0), quarantined.get(seq, 0)
        out.append((seq, ev, st, ev - st - qu, qu))
    return out


def record(
    cur: psycopg.Cursor,
    batch_id: int,
    stream_created: datetime,
    messages: list[tuple[int, int, int, int, int]],
    counts: BatchCounts,
) -> None:
    """Write the per-message and per-batch counts (the database checks that they balance)."""
    cur.execute(
        "UPDATE ingest_messages m SET events = t.e, stored = t.s, duplicates = t.d, quarantined = t.q"
        " FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[], %s::int[]) AS t(seq, e, s, d, q)"
        " WHERE m.stream_seq = t.seq AND m.stream_created = %s",
        [*(list(col) for col in zip(*messages, strict=True)), stream_created],
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
