"""The gateway's state, owned by the app's lifespan: the NATS/JetStream connection (publishing, and
looking up events still in the stream), the database pool (read queries), and what is known about
their health (bounded reads for /readyz and /v1/ingest/status, the outcome of recent publishes)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import psycopg
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from ingest_gateway.group_commit import GroupCommitter
from ingest_gateway.health import DEPENDENCY_TIMEOUT, Dependency, NoAnswer, PublishOutcomes
from ingest_gateway.http import ApiError
from ingest_gateway.metrics_http import publish_failed, publish_succeeded
from meter_platform.capture import jetstream
from meter_platform.capture.envelope import (
    Event,
    GatewayBatch,
    datetime_to_us,
    encode_batch,
    new_event_id,
    now_us,
)
from meter_platform.capture.messages import Message, find_event
from meter_platform.capture.partitions import gateway_subject, split
from meter_platform.catalog import Catalog
from meter_platform.config import BATCH_HEADER, STREAM_NAME, Settings, load_partitions, require_url
from meter_platform.storage import db

log = logging.getLogger("ingest_gateway")
T = TypeVar("T")
#: How long to wait for JetStream's ack (its fsync) before answering 503.
PUBLISH_TIMEOUT = 5.0
#: GET /v1/events/{id} looks for a not-yet-processed id among at most this many pending messages.
PENDING_SCAN_LIMIT = 500
#: ... and for at most this long (newest first: a client usually asks about what it just sent).
PENDING_SCAN_SECONDS = 0.25


class Gateway:
    """The gateway's connections, owned by the app's lifespan."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.engine: AsyncEngine | None = None
        self.nats_calls = Dependency("nats")
        self.db_calls = Dependency("postgres")
        self.publishes = PublishOutcomes()
        #: Called with a request's whole batch before anything of it is published; raises ApiError to
        #: refuse it (the API keys' customer and rate checks, see ingest_gateway/auth.py).
        self.before_publish: Callable[[list[Event]], None] | None = None
        #: ``METER_PARTITIONS``: a request's events are published per partition of their customer.
        self.partitions = load_partitions()
        #: Small requests share JetStream messages, per partition (empty: group commit is off; set in
        #: start()); ``group`` is partition 0's (the only one when unpartitioned).
        self.groups: list[GroupCommitter] = []
        self.group: GroupCommitter | None = None
        #: Parts of at most this many events go through group commit.
        self._group_limit = settings.group_commit_max_request_events
        #: Per partition: publish one message on its subject and await its ack.
        self._publishers = [
            self._publisher(gateway_subject(p, self.partitions)) for p in range(self.partitions)
        ]

    async def start(self) -> None:
        """Connect to NATS (making sure the stream exists) and create the database pool."""
        nats_url = require_url(self.settings.nats_url, "METER_NATS_URL")
        database_url = require_url(self.settings.database_url, "METER_DATABASE_URL")
        # Reconnect forever: while NATS is away, publishes fail fast into 503s, and come back with it.
        self.nc = await jetstream.connect(nats_url, name="meter-gateway", max_reconnect_attempts=-1)
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)
        await jetstream.ensure_stream_and_consumer(self.js)
        self.engine = db.async_engine(database_url)
        if self.settings.group_commit_in_flight > 0:
            self.groups = [
                GroupCommitter(
                    self._publishers[p],
                    max_bytes=self.nc.max_payload - 4096,
                    max_in_flight=self.settings.group_commit_in_flight,
                )
                for p in range(self.partitions)
            ]
            self.group = self.groups[0]
            if self.partitions > 1:
                self._group_limit = self.groups[0].max_events

    async def stop(self) -> None:
        """Flush and close NATS; dispose of the pool."""
        self.nats_calls.cancel_all()
        self.db_calls.cancel_all()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        if self.engine is not None:
            await self.engine.dispose()

    # --- capture ---------------------------------------------------------------------------------

    def _chunks(self, events: list[Event], received_us: int) -> list[bytes]:
        """One message per request; split in halves only when it exceeds the server's max payload."""
        assert self.nc is not None
        limit = self.nc.max_payload - 4096
        pending = [events]
        out: list[bytes] = []
        while pending:
            part = pending.pop()
            payload = encode_batch(GatewayBatch(received_at=received_us, events=part))
            if len(payload) <= limit or len(part) == 1:
                out.append(payload)
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
        return out

    async def publish(self, events: list[Event], received_us: int) -> None:
        """Publish the events durably; raise ApiError(503) when JetStream does not confirm them.

        With ``METER_PARTITIONS`` above 1 the events are split by their customer's partition and each
        part is published on its partition's subject, all at once; the request is durable (and
        answered 202) only once every part is acked. If any part fails, the whole request gets the
        503 with every id, also those of the parts that did land: they are harmless, for the client
        retries with the same ids and the pipeline stores an id once (the retry's copies of the
        landed parts are counted as duplicates), so the retry makes it exact.
        """
        assert self.js is not None and self.nc is not None
        if self.before_publish is not None:
            self.before_publish(events)
        if not self.nc.is_connected:
            publish_failed("not_connected", len(events))
            raise ApiError(
                503,
                "The event broker is unreachable; nothing was stored. Retry shortly.",
                headers={"Retry-After": "2"},
            )
        started = time.perf_counter()
        parts = split(events, _customer, self.partitions)
        try:
            if len(parts) == 1:  # unpartitioned, or every customer in one partition
                await self._publish_part(*parts[0], received_us)
            else:
                outcomes = await asyncio.gather(
                    *(self._publish_part(p, part, received_us) for p, part in parts), return_exceptions=True
                )  # every part has its answer before the request has its own
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
        except Exception as failure:  # any failure means "not durable": the client must retry
            log.warning("JetStream did not confirm a publish: %r", failure)
            detail = str(failure) or type(failure).__name__
            self.publishes.failed(detail)
            publish_failed("not_confirmed", len(events))
            raise ApiError(
                503,
                "Events could not be made durable (broker unavailable or stream full); "
                "nothing is guaranteed stored. Retry with the same ids.",
                # The ids (made here for events sent without one) let a retry be recognised: part of
                # a split request may have been stored before the failure.
                [{"reason": detail, "ids": [e.id for e in events]}],
                headers={"Retry-After": "1"},
            ) from failure
        self.publishes.succeeded()
        publish_succeeded(len(events), time.perf_counter() - started)

    async def _publish_part(self, partition: int, events: list[Event], received_us: int) -> None:
        """One partition's events: shared with its neighbours' when small (group commit), else alone.

        With several partitions, any part up to a group message's size shares: a request split N ways
        would otherwise cost N messages (see :mod:`ingest_gateway.group_commit`).
        """
        if self.groups and len(events) <= self._group_limit:
            await self.groups[partition].submit(events, received_us)
            return
        publish = self._publishers[partition]
        await asyncio.gather(*(publish(p) for p in self._chunks(events, received_us)))

    def _publisher(self, subject: str) -> Callable[[bytes], Awaitable[None]]:
        """Publishes one gateway message on ``subject`` and waits for JetStream's ack (its fsync)."""

        async def publish(payload: bytes) -> None:
            assert self.js is not None
            # The message's own id: should it be sent twice, JetStream stores it once.
            headers = {"Nats-Msg-Id": new_event_id(), BATCH_HEADER: "1"}
            await self.js.publish(subject, payload, stream=STREAM_NAME, headers=headers)

        return publish

    # --- read side -------------------------------------------------------------------------------

    async def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run a read query; a database outage becomes a 503."""
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn:
                return list((await conn.execute(text(sql), params or {})).all())
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError, OperationalError

            if isinstance(exc, OperationalError) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated
            ):
                raise ApiError(
                    503, "The database is unreachable. Retry shortly.", headers={"Retry-After": "2"}
                ) from exc
            raise

    async def read_nats(
        self, read: Callable[[JetStreamContext], Awaitable[T]], timeout: float = DEPENDENCY_TIMEOUT
    ) -> T:
        """``read(js)`` within ``timeout``; NoAnswer if NATS is not connected or does not answer."""
        assert self.js is not None and self.nc is not None
        if not self.nc.is_connected:  # fail fast instead of waiting for a JetStream timeout
            raise NoAnswer("nats", "not connected")
        js = self.js
        return await self.nats_calls.call(lambda: read(js), timeout)

    async def read_db(
        self, sql: str, params: dict[str, Any] | None = None, timeout: float = DEPENDENCY_TIMEOUT
    ) -> list[Any]:
        """:meth:`query` within ``timeout``; NoAnswer if PostgreSQL does not answer."""
        return await self.db_calls.call(lambda: self.query(sql, params), timeout)

    async def find_pending(self, event_id: str) -> dict[str, Any] | None:
        """Look for an accepted, not yet processed event among the messages still in the stream."""
        assert self.js is not None
        backlog = await jetstream.backlog(self.js)
        first = backlog.ack_floor + 1
        deadline = time.monotonic() + PENDING_SCAN_SECONDS
        for seq in range(backlog.last_seq, max(first, backlog.last_seq - PENDING_SCAN_LIMIT + 1) - 1, -1):
            if time.monotonic() > deadline:
                break
            try:
                msg = await self.js.get_msg(STREAM_NAME, seq)
            except NotFoundError:
                continue
            data = msg.data or b""
            header_id = (msg.headers or {}).get("Nats-Msg-Id")
            # A cheap test first: the id is in the body or the header, or the message may hold events
            # published without ids (whose ids are made from the sequence when they are read).
            if (
                header_id != event_id
                and event_id.encode() not in data
                and msgspec.json.encode(event_id)[1:-1] not in data
                and not event_id.startswith(f"nats-{seq}-")
            ):
                continue
            message = Message(
                seq=seq,
                subject=msg.subject or "",
                data=data,
                headers=msg.headers,
                timestamp_us=datetime_to_us(msg.time) if msg.time else now_us(),
            )
            found = find_event(message, event_id)
            if found is not None:
                return {**found, "state": "pending", "stream_seq": seq}
        return None


def _customer(event: Event) -> str:
    return event.customer_id


def gateway_of(request: Request) -> Gateway:
    """The app's Gateway (set by the lifespan)."""
    return request.app.state.gateway


async def in_transaction(gw: Gateway, work: Callable[[psycopg.Connection], T]) -> T:
    """Run ``work`` in one PostgreSQL transaction on its own connection, in a worker thread: for the
    low-volume administrative routes (customers, keys, audit). 503 when the database is unreachable."""
    url = require_url(gw.settings.database_url, "METER_DATABASE_URL")

    def run() -> T:
        try:
            with db.connect(url, connect_timeout=5) as conn:
                result = work(conn)
                conn.commit()
                return result
        except psycopg.OperationalError as exc:
            raise ApiError(
                503, "The database is unreachable. Retry shortly.", headers={"Retry-After": "2"}
            ) from exc

    return await asyncio.to_thread(run)
