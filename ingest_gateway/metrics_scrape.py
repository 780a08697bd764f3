"""The figures ``GET /metrics`` reads at scrape time: JetStream's backlog and the pipeline's ledger.

The pipeline's drains run in Dagster run processes, not in the gateway, so their figures are read
where the pipeline leaves them: the ledger in PostgreSQL (``ingest_batches``, ``ingest_messages``,
``quarantined_events``; see :mod:`meter_platform.ingestion.ledger`). A scrape reads NATS once (stream,
consumer, oldest waiting message) and PostgreSQL once (:data:`LEDGER_SQL`), each within a bound, so a
scrape answers in about :data:`SCRAPE_DEADLINE` seconds even when a server hangs: what did not come
is left out and ``meter_scrape_dependency_up`` says which.

:func:`families` is pure: figures in, metric families out, for :class:`ScrapeCollector`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest_gateway.gateway import Gateway
from meter_platform.capture import jetstream
from meter_platform.config import CONSUMER_NAME, STREAM_NAME

log = logging.getLogger("ingest_gateway")
#: A scrape answers within about this long (NATS slow too: at most its bound plus :data:`_DB_MIN`).
SCRAPE_DEADLINE = 1.5
#: NATS gets at most this much of it; PostgreSQL the rest (at least :data:`_DB_MIN`).
_NATS_TIMEOUT = 1.0
_DB_MIN = 0.5
#: Batch intervals are measured over the ledger's newest batches (an index scan of the primary key).
RECENT_BATCHES = 100

#: One query per scrape. Totals sum ``ingest_batches`` (one row per micro-batch, a thousand times
#: fewer rows than events; never ``usage_events``); the replay counts use the partial index
#: ``quarantined_events_moved``; the recent batches read the newest rows by primary key. The
#: ``{in_range}`` column (ledger rows within the stream's sequence range, by the primary key of
#: ``ingest_messages``) is filled in only when NATS told the range.
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
)
SELECT t.events, t.stored, t.duplicates, t.quarantined, t.messages, t.batches, t.last_commit,
       (SELECT count(*) FROM quarantined_events WHERE status = 'replayed') AS replayed,
       (SELECT count(*) FROM quarantined_events WHERE status = 'duplicate') AS replay_duplicates,
       (SELECT avg(gap) FROM gaps) AS gap_avg, (SELECT max(gap) FROM gaps) AS gap_max,
       {in_range} AS in_range
FROM totals t
"""
_IN_RANGE = (
    "(SELECT count(*) FROM ingest_messages"
    " WHERE stream_created = :created AND stream_seq BETWEEN :first AND :last)"
)


def ledger_sql(with_range: bool) -> str:
    """:data:`LEDGER_SQL`, counting the ledger rows in the stream's range when ``with_range``."""
    return LEDGER_SQL.format(recent=RECENT_BATCHES, in_range=_IN_RANGE if with_range else "NULL")


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
    in_range: int | None

    @classmethod
    def from_row(cls, row: Any) -> LedgerFigures:
        """From a row of :func:`ledger_sql`."""
        ev, st, du, qu, msgs, batches, last, rep, rep_dup, gap_avg, gap_max, in_range = row
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
            in_range=int(in_range) if in_range is not None else None,
        )


@dataclass
class Snapshot:
    """One scrape's figures; ``None`` for a part whose dependency did not answer in time."""

    stream: StreamFigures | None = None
    ledger: LedgerFigures | None = None
    now: float = field(default_factory=time.time)
    seconds: float = 0.0  # how long the reads took


async def _read_stream(js: JetStreamContext) -> StreamFigures:
    stream = await js.stream_info(STREAM_NAME)
    consumer = await js.consumer_info(STREAM_NAME, CONSUMER_NAME)
    ack_pending = consumer.num_ack_pending or 0
    pending = (consumer.num_pending or 0) + ack_pending
    oldest = await jetstream.oldest_pending(js) if pending else None
    return StreamFigures(
        last_seq=stream.state.last_seq,
        first_seq=stream.state.first_seq,
        messages=stream.state.messages,
        bytes=stream.state.bytes,
        created=stream.created if isinstance(stream.created, datetime) else None,
        pending=pending,
        ack_pending=ack_pending,
        ack_floor=consumer.ack_floor.stream_seq if consumer.ack_floor else 0,
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
    if t.last_commit is not None:
        yield _gauge(
            "meter_pipeline_last_commit_timestamp_seconds",
            "Unix time of the newest micro-batch's write transaction.",
            t.last_commit.timestamp(),
        )
    gaps = GaugeMetricFamily(
        "meter_pipeline_batch_interval_seconds",
        f"Seconds between the write transactions of consecutive micro-batches of one pipeline run, over "
        f"the newest {RECENT_BATCHES} batches (stat: avg, max). While a backlog drains this is the time "
        "one batch takes (write, ack, fetch, validate); when the stream is idle it includes the wait "
        "for messages. The ledger keeps no per-batch start/end times, so this is what it supports.",
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


class ScrapeCollector(Collector):
    """A custom collector over one :class:`Snapshot` (read once per scrape, bounded)."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        """The snapshot's metric families."""
        return list(families(self.snapshot))
