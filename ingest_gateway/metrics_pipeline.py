"""The pipeline's figures for ``GET /metrics``, pure: SQL text, rows in, metric families out.

The pipeline's drains run in Dagster run processes, not in the gateway, so their figures are read at
scrape time where the pipeline leaves them: the ledger in PostgreSQL (``ingest_batches``,
``ingest_messages``, ``quarantined_events``; see :mod:`meter_platform.ingestion.ledger`) and the
newest rows of ``usage_events``, in one query (:func:`ledger_sql`); and JetStream's stream and
consumer. The reading is :mod:`ingest_gateway.metrics_scrape`; this module does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Batch intervals are measured over the ledger's newest batches (an index scan of the primary key).
RECENT_BATCHES = 100
#: The batch delay is read from the events in the last pages of the day partitions of ``usage_events``
#: around now (the newest rows of insert-only tables): a TID range scan of 32 pages (256 KiB) of each
#: of yesterday's, today's and tomorrow's (UTC), whatever their size (``usage_events_tail``, migration
#: 0010: the partitioned parent has no pages of its own).
TAIL_PAGES = 32

#: One query per scrape. Totals sum ``ingest_batches`` (one row per micro-batch, hundreds of times
#: fewer rows than events; never a count over ``usage_events``); the replay counts use the partial
#: index ``quarantined_events_moved``; the recent batches read the newest rows by primary key; the
#: tail reads the last :data:`TAIL_PAGES` pages of the newest day partitions by TID range and keeps the
#: newest batch found there (its events share ``stored_at``, the write transaction's ``now()``). The
#: ``{in_range}`` column (ledger rows within the stream's sequence range, by the primary key of
#: ``ingest_messages``) is filled in only when NATS told the range. Measured on 4 million events,
#: 20,000 batches: 25 ms, 300 buffers.
LEDGER_SQL = """
WITH totals AS (
    SELECT coalesce(sum(events), 0) AS events, coalesce(sum(stored), 0) AS stored,
           coalesce(sum(duplicates), 0) AS duplicates, coalesce(sum(quarantined), 0) AS quarantined,
           coalesce(sum(messages), 0) AS messages, count(*) AS batches, max(committed_at) AS last_commit
    FROM ingest_batches
), recent AS (
    SELECT run_id, committed_at FROM ingest_batches ORDER BY batch_id DESC LIMIT {recent}
), gaps AS (
    SELECT extract(epoch FROM committed_at - lag(committed_at)
                   OVER (PARTITION BY run_id ORDER BY committed_at)) AS gap
    FROM recent
), tail AS (
    SELECT stored_at, min(received_at) AS oldest, max(received_at) AS newest FROM usage_events_tail({tail})
    GROUP BY stored_at ORDER BY stored_at DESC LIMIT 1
)
SELECT t.events, t.stored, t.duplicates, t.quarantined, t.messages, t.batches, t.last_commit,
       (SELECT count(*) FROM quarantined_events WHERE status = 'replayed') AS replayed,
       (SELECT count(*) FROM quarantined_events WHERE status = 'duplicate') AS replay_duplicates,
       (SELECT avg(gap) FROM gaps) AS gap_avg, (SELECT max(gap) FROM gaps) AS gap_max,
       (SELECT extract(epoch FROM stored_at - oldest) FROM tail) AS delay_max,
       (SELECT extract(epoch FROM stored_at - newest) FROM tail) AS delay_min,
       (SELECT newest FROM tail) AS newest_received,
       {in_range} AS in_range
FROM totals t
"""

_IN_RANGE = (
    "(SELECT count(*) FROM ingest_messages"
    " WHERE stream_created = :created AND stream_seq BETWEEN :first AND :last)"
)


def ledger_sql(with_range: bool) -> str:
    """:data:`LEDGER_SQL`, counting the ledger rows in the stream's range when ``with_range``."""
    return LEDGER_SQL.format(
        recent=RECENT_BATCHES, tail=TAIL_PAGES, in_range=_IN_RANGE if with_range else "NULL"
    )


@dataclass(frozen=True)
class StreamFigures:
    """What NATS said about the stream and the pipeline's consumer."""

    last_seq: int
    first_seq: int
    messages: int
    bytes: int
    created: datetime | None
    pending: int  # not yet delivered + delivered and not acked, as /v1/ingest/status counts it
    ack_pending: int
    ack_floor: int
    oldest_waiting: datetime | None  # when JetStream stored the oldest message not yet acked


@dataclass(frozen=True)
class LedgerFigures:
    """What the ledger says; counters only grow (a replay moves events out of quarantine, it does not
    lower ``quarantined``, which counts quarantines at ingest)."""

    events: int
    stored: int
    duplicates: int
    quarantined: int
    messages: int
    batches: int
    last_commit: datetime | None
    replayed: int
    replay_duplicates: int
    gap_avg: float | None
    gap_max: float | None
    delay_max: float | None
    delay_min: float | None
    newest_received: datetime | None
    in_range: int | None

    @classmethod
    def from_row(cls, row: Any) -> LedgerFigures:
        """From a row of :func:`ledger_sql`."""
        (
            ev,
            st,
            du,
            qu,
            msgs,
            batches,
            last,
            rep,
            rep_dup,
            gap_avg,
            gap_max,
            d_max,
            d_min,
            newest,
            in_range,
        ) = row
        return cls(
            events=int(ev),
            stored=int(st),
            duplicates=int(du),
            quarantined=int(qu),
            messages=int(msgs),
            batches=int(batches),
            last_commit=last,
            replayed=int(rep),
            replay_duplicates=int(rep_dup),
            gap_avg=float(gap_avg) if gap_avg is not None else None,
            gap_max=float(gap_max) if gap_max is not None else None,
            delay_max=float(d_max) if d_max is not None else None,
            delay_min=float(d_min) if d_min is not None else None,
            newest_received=newest,
            in_range=int(in_range) if in_range is not None else None,
        )


@dataclass
class Snapshot:
    """One scrape's figures; ``None`` for a part whose dependency did not answer in time."""

    stream: StreamFigures | None = None
    ledger: LedgerFigures | None = None
    now: float = field(default_factory=time.time)
    seconds: float = 0.0  # how long the reads took


def _uncounted(s: StreamFigures, ledger: LedgerFigures | None) -> int | None:
    """Messages in the stream the ledger lacks: the backlog truly left (see ``status._uncounted``)."""
    if s.messages == 0:
        return 0
    if ledger is None or ledger.in_range is None:
        return None
    return max(0, min(s.messages, s.last_seq - s.first_seq + 1 - ledger.in_range))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _stream_families(s: StreamFigures, ledger: LedgerFigures | None, now: float) -> Iterator[Metric]:
    yield _gauge(
        "meter_jetstream_stream_last_seq", "Sequence of the newest message in the stream.", s.last_seq
    )
    yield _gauge(
        "meter_jetstream_stream_messages",
        "Messages in the stream (a work queue: those not yet acked by the pipeline).",
        s.messages,
    )
    yield _gauge("meter_jetstream_stream_bytes", "Bytes the stream holds.", s.bytes)
    yield _gauge(
        "meter_jetstream_consumer_pending",
        "Messages the pipeline's consumer has not acked (not yet delivered + delivered, unacked).",
        s.pending,
    )
    yield _gauge(
        "meter_jetstream_consumer_ack_pending",
        "Messages delivered to the pipeline, not acked yet.",
        s.ack_pending,
    )
    yield _gauge(
        "meter_jetstream_consumer_ack_floor",
        "Stream sequence up to which the pipeline acked every message.",
        s.ack_floor,
    )
    uncounted = _uncounted(s, ledger)
    if uncounted is not None:
        yield _gauge(
            "meter_jetstream_consumer_uncounted",
            "Messages in the stream that the ledger does not have: the backlog truly left to process.",
            uncounted,
        )
    age = max(0.0, now - s.oldest_waiting.timestamp()) if s.oldest_waiting else 0.0
    yield _gauge(
        "meter_pipeline_oldest_waiting_seconds",
        "Freshness lag: age of the oldest message JetStream holds that the pipeline has not "
        "committed and acked (now minus when JetStream stored it); 0 when nothing waits.",
        age,
    )


def _ledger_families(t: LedgerFigures) -> Iterator[Metric]:
    yield _counter(
        "meter_pipeline_events_processed",
        "Events the pipeline took from JetStream and committed to the ledger "
        "(= stored + duplicates + quarantined).",
        t.events,
    )
    yield _counter("meter_pipeline_events_stored", "Events stored on ingest (new ids).", t.stored)
    yield _counter(
        "meter_pipeline_events_duplicates", "Events whose id was stored before: counted once.", t.duplicates
    )
    yield _counter(
        "meter_pipeline_events_quarantined",
        "Events quarantined on ingest (invalid); replays out of quarantine do not lower it.",
        t.quarantined,
    )
    replays = CounterMetricFamily(
        "meter_quarantine_replayed",
        "Quarantined events moved out by a replay, by outcome (stored, or duplicate of a stored id).",
        labels=["outcome"],
    )
    replays.add_metric(["stored"], t.replayed)
    replays.add_metric(["duplicate"], t.replay_duplicates)
    yield replays
    yield _gauge(
        "meter_quarantine_open",
        "Events in quarantine now (quarantined on ingest and not moved out by a replay).",
        t.quarantined - t.replayed - t.replay_duplicates,
    )
    yield _counter("meter_pipeline_messages", "JetStream messages committed to the ledger.", t.messages)
    yield _counter("meter_pipeline_batches", "Micro-batches committed (ledger rows).", t.batches)


def _batch_families(t: LedgerFigures) -> Iterator[Metric]:
    """When and how fast the micro-batches go. The ledger keeps no per-batch start/end times; these
    come from its commit times and from the events' own ``received_at`` and ``stored_at``."""
    if t.last_commit is not None:
        yield _gauge(
            "meter_pipeline_last_commit_timestamp_seconds",
            "Unix time of the newest micro-batch's write transaction.",
            t.last_commit.timestamp(),
        )
    if t.newest_received is not None:
        yield _gauge(
            "meter_pipeline_newest_received_timestamp_seconds",
            "Unix time the newest stored event was received (gateway receive time, or JetStream store "
            "time for events published straight to the stream): time() minus this is how stale the data is.",
            t.newest_received.timestamp(),
        )
    delay = GaugeMetricFamily(
        "meter_pipeline_batch_delay_seconds",
        f"Newest micro-batch that stored events (found in the last {TAIL_PAGES} pages of the day "
        "partitions of usage_events around now): "
        "seconds from an event's receipt (gateway receive time, or JetStream store time for events "
        "published straight to the stream) to the start of the batch's write transaction; stat=max for "
        "its longest-waiting event, min for its newest. Includes the wait in JetStream.",
        labels=["stat"],
    )
    if t.delay_max is not None and t.delay_min is not None:
        delay.add_metric(["max"], t.delay_max)
        delay.add_metric(["min"], t.delay_min)
    yield delay
    gaps = GaugeMetricFamily(
        "meter_pipeline_batch_interval_seconds",
        f"Seconds between the write transactions of consecutive micro-batches of one pipeline run, over "
        f"the newest {RECENT_BATCHES} batches (stat: avg, max). While a backlog drains this is the time "
        "one batch takes (write, ack, fetch, validate); when the stream is idle it includes the wait "
        "for messages.",
        labels=["stat"],
    )
    if t.gap_avg is not None and t.gap_max is not None:
        gaps.add_metric(["avg"], t.gap_avg)
        gaps.add_metric(["max"], t.gap_max)
    yield gaps


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (pure)."""
    up = GaugeMetricFamily(
        "meter_scrape_dependency_up",
        "Whether the dependency answered this scrape in time (1) or not (0, its figures are left out).",
        labels=["dependency"],
    )
    up.add_metric(["nats"], 1 if snap.stream is not None else 0)
    up.add_metric(["postgres"], 1 if snap.ledger is not None else 0)
    yield up
    yield _gauge(
        "meter_scrape_read_seconds", "How long this scrape took to read NATS and PostgreSQL.", snap.seconds
    )
    if snap.stream is not None:
        yield from _stream_families(snap.stream, snap.ledger, snap.now)
    if snap.ledger is not None:
        yield from _ledger_families(snap.ledger)
        yield from _batch_families(snap.ledger)


class ScrapeCollector(Collector):
    """A custom collector over one :class:`Snapshot` (read once per scrape, bounded)."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        """The snapshot's metric families."""
        return list(families(self.snapshot))
