"""The drain loop: fetch micro-batches from the durable consumer, write each, and only then ack.

Steps 1 and 5 of the guarantee written in :mod:`meter_platform.ingestion.writer`: nothing is acked
before its batch is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from meter_platform.capture.jetstream import connect, ensure_stream_and_consumer, stream_incarnation
from meter_platform.capture.messages import Message, from_nats
from meter_platform.capture.partitions import consumer_name
from meter_platform.catalog import Catalog
from meter_platform.config import STREAM_NAME, DrainSettings, load_partitions
from meter_platform.ingestion.counts import BatchCounts
from meter_platform.ingestion.writer import MicroBatchWriter

log = logging.getLogger(__name__)


async def drain(
    nats_url: str,
    database_url: str,
    catalog: Catalog,
    settings: DrainSettings | None = None,
    run_id: str | None = None,
    on_batch: Callable[[BatchCounts], None] | None = None,
    crash_after_commit: bool = False,
    should_stop: Callable[[], bool] | None = None,
    heartbeat: Callable[[], None] | None = None,
    partition: int = 0,
) -> BatchCounts:
    """Drain the durable consumer in micro-batches until idle or out of time; return the run's counts.

    ``partition`` names the consumer: with ``METER_PARTITIONS`` above 1, ``meter-ingest-p<partition>``
    (each partition is drained by its own runs, in parallel with the others'); unpartitioned, the one
    consumer ``meter-ingest``. Any number of drains may share a consumer too: the ledger keeps them exact.

    ``should_stop`` is asked before every fetch (at least every ``fetch_timeout`` seconds, and after
    each batch): once it answers True the drain fetches nothing more and returns, e.g. when the run it
    belongs to is gone. Anything fetched and not yet committed is left un-acked and so redelivered.
    ``heartbeat`` is called every ``settings.heartbeat_seconds`` while the drain runs (in a thread, so
    a slow batch does not delay it): proof to whoever watches the run that its process is alive.

    ``crash_after_commit`` exists for the test that kills a run between commit and ack: it raises
    right after the first commit, leaving that batch's messages un-acked.
    """
    settings = settings or DrainSettings()
    partitions = load_partitions()
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} does not exist: METER_PARTITIONS is {partitions}")
    consumer = consumer_name(partition, partitions)
    total = BatchCounts()
    beating = asyncio.create_task(_beat(heartbeat, settings.heartbeat_seconds)) if heartbeat else None
    try:
        writer = MicroBatchWriter(catalog, database_url)
        nc = await connect(nats_url, name=f"{consumer}-{run_id or 'local'}")
        try:
            js = nc.jetstream()
            await ensure_stream_and_consumer(js)
            stream_created = await stream_incarnation(js)
            sub = await _bind(js, consumer)
            started = last_seen = time.monotonic()
            while time.monotonic() - started < settings.max_seconds:
                if should_stop is not None and should_stop():
                    log.warning(
                        "drain stopped: its run is gone; what it fetched and did not ack is redelivered"
                    )
                    break
                fetch_began = time.perf_counter()
                try:
                    fetched = await sub.fetch(settings.batch_size, timeout=settings.fetch_timeout)
                except (NatsTimeoutError, TimeoutError):
                    if time.monotonic() - last_seen >= settings.idle_seconds:
                        break
                    continue
                if not fetched:  # nats-py can return an empty fetch on a stale pull status
                    continue
                last_seen = time.monotonic()
                fetch_seconds = time.perf_counter() - fetch_began  # includes waiting for the first message
                messages = [from_nats(m, stream_created) for m in fetched]
                counts = await _commit_then_ack(nc, writer, fetched, messages, run_id, crash_after_commit)
                counts.stages["fetch"] = fetch_seconds
                total.add(counts)
                if on_batch is not None:
                    on_batch(counts)
            return total
        finally:
            writer.close()
            # close(), not drain(): every ack was flushed above, and what was fetched but not acked
            # must simply be left to redelivery.
            await nc.close()
    finally:
        if beating is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating


async def _bind(js: JetStreamContext, consumer: str) -> JetStreamContext.PullSubscription:
    """Bind to the consumer, or say why it is missing (the stream laid out for another N)."""
    try:
        await js.consumer_info(STREAM_NAME, consumer)
    except NotFoundError as exc:
        raise RuntimeError(
            f"consumer {consumer} does not exist on stream {STREAM_NAME}: its consumers are laid out for "
            f"another METER_PARTITIONS than {load_partitions()}; `meter up` applies the change"
        ) from exc
    return await js.pull_subscribe_bind(consumer, STREAM_NAME)


async def _commit_then_ack(
    nc: Client,
    writer: MicroBatchWriter,
    fetched: list[Msg],
    messages: list[Message],
    run_id: str | None,
    crash_after_commit: bool,
) -> BatchCounts:
    """Steps 2-5 for one fetched batch: write and commit (off the event loop, so the NATS connection
    stays responsive), then ack."""
    counts = await asyncio.to_thread(writer.write, messages, run_id)
    if crash_after_commit:
        raise RuntimeError("simulated crash between commit and ack")
    # 5. Only now, after the commit, ack. A crash before this line means redelivery, which step 3a
    # turns into a no-op.
    ack_began = time.perf_counter()
    for m in fetched:
        await m.ack()
    await nc.flush()
    counts.stages["ack"] = time.perf_counter() - ack_began
    return counts


async def _beat(heartbeat: Callable[[], None], every: float) -> None:
    while True:
        try:
            await asyncio.to_thread(heartbeat)
        except Exception as exc:  # a heartbeat that cannot be written must not stop the drain
            log.warning("drain heartbeat failed: %s", exc)
        await asyncio.sleep(every)


def parent_exited() -> Callable[[], bool]:
    """A ``should_stop`` that answers True once the process that started this one has exited.

    A Dagster step runs in a child of its run worker: when the worker is killed, the step is
    re-parented (to init or a subreaper) and must stop draining, for nothing would record its run.
    """
    parent = os.getppid()
    return lambda: os.getppid() != parent
