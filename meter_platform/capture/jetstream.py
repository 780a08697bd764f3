"""The JetStream side of the spine: the stream that holds accepted events and the durable consumer
that the micro-batch job drains. Created idempotently by every process that needs them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from meter_platform.capture.partitions import consumer_name, is_ours, layout
from meter_platform.config import (
    CONSUMER_NAME,
    STREAM_NAME,
    STREAM_SUBJECTS,
    load_partitions,
    load_stream_limits,
    load_stream_replicas,
)

log = logging.getLogger(__name__)

#: How long a delivered message may stay un-acked before JetStream redelivers it. A micro-batch
#: commits well within this; a run killed mid-batch has its messages redelivered after it.
ACK_WAIT_SECONDS = 60.0
#: JetStream drops a second publish with the same Nats-Msg-Id inside this window (a publisher's
#: retry); PostgreSQL's primary key on the event id dedups forever after.
DUPLICATE_WINDOW_SECONDS = 120.0


def stream_config() -> StreamConfig:
    """The events stream: a work queue on disk.

    Work-queue retention keeps exactly the events not yet committed to PostgreSQL: a message leaves
    the stream when the pipeline acks it, after its commit. ``discard: new`` makes a full stream
    refuse new publishes (the gateway answers 503) rather than drop events nobody has stored yet.
    ``num_replicas`` is ``METER_STREAM_REPLICAS``: 3 on a 3-node cluster, so a publish is acked once a
    majority of the nodes has stored it (each fsync'ing first) and any one node may fail.
    """
    limits = load_stream_limits()
    return StreamConfig(
        name=STREAM_NAME,
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_bytes=limits.max_bytes,
        max_msgs=limits.max_msgs,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        num_replicas=load_stream_replicas(),
    )


#: JetStream's refusals of a consumer whose filter overlaps another's on a work-queue stream.
_OVERLAP_ERRORS = (10099, 10100)


def consumer_config(name: str = CONSUMER_NAME, subjects: list[str] | None = None) -> ConsumerConfig:
    """A durable pull consumer of the micro-batch job: explicit acks, never gives up redelivering.

    ``subjects`` are its filter (a partition's, see :mod:`meter_platform.capture.partitions`); none:
    it takes every subject, as the one consumer of an unpartitioned stream does. Its replicas are left
    unset (0): the consumer follows the stream's, also when those change, as a work-queue stream requires.
    """
    return ConsumerConfig(
        durable_name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_SECONDS,
        max_deliver=-1,
        max_ack_pending=50_000,
        filter_subjects=list(subjects) if subjects else None,
    )


def server_list(url: str) -> list[str]:
    """The servers of ``METER_NATS_URL``: one URL, or several separated by commas (a cluster's nodes)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def connect(url: str, name: str, **kwargs) -> Client:
    """Connect to NATS, failing fast (no endless reconnect at start-up).

    ``url`` may list several servers separated by commas (``nats://a:4222,nats://b:4222``): the client
    connects to one of them and, should it go away, reconnects to another.
    """
    return await nats.connect(
        server_list(url),
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=kwargs.pop("max_reconnect_attempts", 60),
        reconnect_time_wait=0.5,
        **kwargs,
    )


async def ensure_stream_and_consumer(js: JetStreamContext, *, apply_limits: bool = False) -> None:
    """Create the stream and the durable consumers of ``METER_PARTITIONS``'s layout if they are missing.

    Existing ones are left as they are, so an operator's tuning (limits, ack wait) survives while the
    platform runs; every process calls this, the sensor on each tick. With ``apply_limits`` (the
    platform's start, ``meter up``), the stream's size limits are set to ``METER_STREAM_MAX_MSGS`` /
    ``METER_STREAM_MAX_BYTES`` (unset: unlimited) when they differ. Lowering a limit below what the
    stream holds drops nothing: the stream discards new publishes, never stored ones. Its replicas are
    set to ``METER_STREAM_REPLICAS`` too: JetStream copies the stored messages to the new replicas (or
    drops the extra ones) while the stream keeps serving, and the consumer follows.

    With ``apply_limits`` the consumers are also reconciled with ``METER_PARTITIONS``
    (:func:`reconcile_consumers`); without, a missing consumer of the layout is created and nothing is
    deleted: one that the layout on the server forbids (its filter overlaps an existing consumer's,
    the server being laid out for another N) is left out with a warning until ``meter up`` applies
    the change. Every layout covers every subject, so nothing waits unowned meanwhile.
    """
    try:
        info = await js.stream_info(STREAM_NAME)
    except NotFoundError:
        await js.add_stream(stream_config())
    else:
        if apply_limits:
            await _apply_limits(js, info.config)
    wanted = layout(load_partitions())
    if apply_limits:
        await reconcile_consumers(js, wanted)
    for name, subjects in wanted.items():
        try:
            await js.consumer_info(STREAM_NAME, name)
        except NotFoundError:
            await _add_consumer(js, name, subjects, strict=apply_limits)


async def _add_consumer(js: JetStreamContext, name: str, subjects: list[str], *, strict: bool) -> None:
    try:
        await js.add_consumer(STREAM_NAME, consumer_config(name, subjects))
    except BadRequestError as exc:
        if strict or exc.err_code not in _OVERLAP_ERRORS:
            raise
        log.warning(
            "consumer %s not created: %s; the stream's consumers are laid out for another "
            "METER_PARTITIONS (`meter up` applies METER_PARTITIONS=%d)",
            name,
            exc.description,
            load_partitions(),
        )


async def reconcile_consumers(js: JetStreamContext, wanted: dict[str, list[str]]) -> list[str]:
    """Delete the platform's consumers that are not in ``wanted`` (or filter other subjects); return
    their names. The caller then creates the missing ones.

    Deleting a consumer of a work-queue stream leaves its messages in the stream, the un-acked ones
    included: the new consumers (``deliver: all``) receive them. A drain still bound to a deleted
    consumer may commit a batch whose acks then go nowhere; its messages are delivered again to the
    new consumer and the per-message ledger (keyed by stream sequence, unique across the stream
    whatever the consumers) turns them into no-ops. Consumers that are not the platform's are left alone.
    """
    deleted = []
    for info in await js.consumers_info(STREAM_NAME):
        if not is_ours(info.name):
            continue
        subjects = _filters(info.config)
        if info.name in wanted and sorted(subjects) == sorted(wanted[info.name]):
            continue
        await js.delete_consumer(STREAM_NAME, info.name)
        log.warning("consumer %s deleted: not in the layout of METER_PARTITIONS=%d", info.name, len(wanted))
        deleted.append(info.name)
    return deleted


async def _apply_limits(js: JetStreamContext, current: StreamConfig) -> None:
    limits, replicas = load_stream_limits(), load_stream_replicas()
    wanted = (limits.max_msgs, limits.max_bytes, replicas)
    if (current.max_msgs, current.max_bytes, current.num_replicas or 1) == wanted:
        return
    await js.update_stream(
        replace(current, max_msgs=limits.max_msgs, max_bytes=limits.max_bytes, num_replicas=replicas)
    )


async def stream_incarnation(js: JetStreamContext) -> datetime:
    """When the stream was created: with the sequence, it identifies a message across re-creations."""
    created = (await js.stream_info(STREAM_NAME)).created
    if created is None:
        raise RuntimeError(f"JetStream did not report when stream {STREAM_NAME} was created")
    return created if isinstance(created, datetime) else datetime.fromisoformat(str(created))


@dataclass(frozen=True)
class PartitionBacklog:
    """One consumer's figures (one partition's; the only one when unpartitioned)."""

    partition: int
    consumer: str
    pending: int  # not yet delivered
    ack_pending: int  # delivered, not acked
    ack_floor: int  # stream sequence up to which all of its messages are acked
    delivered_seq: int  # the last stream sequence delivered to it (grows as its messages arrive and go)


@dataclass(frozen=True)
class Backlog:
    """What the stream holds and how far the consumers are: ``pending`` and ``ack_pending`` summed
    over the consumers, ``ack_floor`` the lowest; each consumer's own in ``partitions``."""

    last_seq: int
    messages: int
    pending: int
    ack_pending: int
    ack_floor: int
    stream_created: datetime | None = None
    partitions: tuple[PartitionBacklog, ...] = ()


def _partition_backlog(partition: int, info: ConsumerInfo) -> PartitionBacklog:
    return PartitionBacklog(
        partition=partition,
        consumer=info.name,
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        delivered_seq=info.delivered.stream_seq if info.delivered else 0,
    )


async def consumer_infos(js: JetStreamContext, partitions: int | None = None) -> list[ConsumerInfo]:
    """The consumers of the layout (``METER_PARTITIONS`` unless given), read at once, in partition order."""
    n = partitions or load_partitions()
    return list(await asyncio.gather(*(js.consumer_info(STREAM_NAME, consumer_name(p, n)) for p in range(n))))


async def backlog(js: JetStreamContext, partitions: int | None = None) -> Backlog:
    """Read the stream's state and every consumer's (one API call each, the consumers at once)."""
    stream, consumers = await asyncio.gather(js.stream_info(STREAM_NAME), consumer_infos(js, partitions))
    return summed(stream, consumers)


def summed(stream: StreamInfo, consumers: list[ConsumerInfo]) -> Backlog:
    """The stream and its consumers as one :class:`Backlog` (the consumers in partition order)."""
    parts = tuple(_partition_backlog(p, info) for p, info in enumerate(consumers))
    return Backlog(
        last_seq=stream.state.last_seq,
        messages=stream.state.messages,
        pending=sum(p.pending for p in parts),
        ack_pending=sum(p.ack_pending for p in parts),
        ack_floor=min((p.ack_floor for p in parts), default=0),
        stream_created=stream.created if isinstance(stream.created, datetime) else None,
        partitions=parts,
    )


async def oldest_pending(js: JetStreamContext) -> datetime | None:
    """When JetStream stored the oldest message the pipeline has not committed yet (None: none waits):
    the oldest over the consumers (:func:`_oldest_of`)."""
    consumers = await consumer_infos(js)
    oldest = [await _oldest_of(js, info) for info in consumers if info.num_pending or info.num_ack_pending]
    return min((t for t in oldest if t is not None), default=None)


def _filters(config: ConsumerConfig) -> list[str]:
    """A consumer's filter subjects (empty: it takes every subject)."""
    return config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])


async def _oldest_of(js: JetStreamContext, info: ConsumerInfo) -> datetime | None:
    """The oldest message one consumer has not had acked.

    That is the first of its messages after its ack floor (every one of its messages up to the floor
    is acked); not the stream's first message, for a store that failed a write may keep messages that
    were acked (seen after a full disk). An unfiltered consumer's is the message right after the
    floor; if the floor moves meanwhile, it is read again. A filtered consumer's (a partition's) is
    the first message after the floor on any of its subjects: one lookup per subject.
    """
    subjects = _filters(info.config)
    if subjects:
        floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        times = []
        for subject in subjects:
            try:
                msg = await js.get_msg(STREAM_NAME, seq=floor + 1, subject=subject, next=True)
            except NotFoundError:
                continue
            if msg.time is not None:
                times.append(msg.time)
        return min(times, default=None)
    for _ in range(5):
        consumer = await js.consumer_info(STREAM_NAME, info.name)
        if not (consumer.num_pending or consumer.num_ack_pending):
            return None
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor and consumer.ack_floor.stream_seq else 0
        seq = max(floor + 1, (await js.stream_info(STREAM_NAME)).state.first_seq)
        try:
            stored = (await js.get_msg(STREAM_NAME, seq=seq)).time
        except NotFoundError:
            continue
        if stored is None:
            raise RuntimeError(f"JetStream did not report when message {seq} was stored")
        return stored
    raise RuntimeError(f"the oldest pending message of stream {STREAM_NAME} kept moving while being read")
