"""The JetStream side of the spine: the stream that holds accepted events and the durable consumer
that the micro-batch job drains. Created idempotently by every process that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from meter_platform.config import (
    CONSUMER_NAME,
    STREAM_NAME,
    STREAM_SUBJECTS,
    load_stream_limits,
    load_stream_replicas,
)

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


def consumer_config() -> ConsumerConfig:
    """The durable pull consumer of the micro-batch job: explicit acks, never gives up redelivering.

    Its replicas are left unset (0): the consumer follows the stream's, also when those change, as a
    work-queue stream requires.
    """
    return ConsumerConfig(
        durable_name=CONSUMER_NAME,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_SECONDS,
        max_deliver=-1,
        max_ack_pending=50_000,
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
    """Create the stream and the durable consumer if they are missing.

    Existing ones are left as they are, so an operator's tuning (limits, ack wait) survives while the
    platform runs; every process calls this, the sensor on each tick. With ``apply_limits`` (the
    platform's start, ``meter up``), the stream's size limits are set to ``METER_STREAM_MAX_MSGS`` /
    ``METER_STREAM_MAX_BYTES`` (unset: unlimited) when they differ. Lowering a limit below what the
    stream holds drops nothing: the stream discards new publishes, never stored ones. Its replicas are
    set to ``METER_STREAM_REPLICAS`` too: JetStream copies the stored messages to the new replicas (or
    drops the extra ones) while the stream keeps serving, and the consumer follows.
    """
    try:
        info = await js.stream_info(STREAM_NAME)
    except NotFoundError:
        await js.add_stream(stream_config())
    else:
        if apply_limits:
            await _apply_limits(js, info.config)
    try:
        await js.consumer_info(STREAM_NAME, CONSUMER_NAME)
    except NotFoundError:
        await js.add_consumer(STREAM_NAME, consumer_config())


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
class Backlog:
    """What the stream holds and how far the consumer is."""

    last_seq: int
    messages: int
    pending: int
    ack_pending: int
    ack_floor: int
    stream_created: datetime | None = None


async def backlog(js: JetStreamContext) -> Backlog:
    """Read stream and consumer state in two API calls."""
    stream = await js.stream_info(STREAM_NAME)
    consumer = await js.consumer_info(STREAM_NAME, CONSUMER_NAME)
    return Backlog(
        last_seq=stream.state.last_seq,
        messages=stream.state.messages,
        pending=consumer.num_pending or 0,
        ack_pending=consumer.num_ack_pending or 0,
        ack_floor=consumer.ack_floor.stream_seq if consumer.ack_floor else 0,
        stream_created=stream.created if isinstance(stream.created, datetime) else None,
    )


async def oldest_pending(js: JetStreamContext) -> datetime | None:
    """When JetStream stored the oldest message the pipeline has not committed yet (None: none waits).

    That is the message right after the consumer's ack floor (every message up to the floor is acked,
    the next one is not); not the stream's first message, for a store that failed a write may keep
    messages that were acked (seen after a full disk). If the floor moves meanwhile, it is read again.
    """
    for _ in range(5):
        consumer = await js.consumer_info(STREAM_NAME, CONSUMER_NAME)
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
