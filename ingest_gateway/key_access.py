"""The gateway's view of the API keys: a snapshot of every active key, reloaded every few seconds, and
each key's rate buckets. The checks at the door that use it are in :mod:`ingest_gateway.auth`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from ingest_gateway.gateway import Gateway
from ingest_gateway.health import DEPENDENCY_TIMEOUT, Dependency, NoAnswer
from ingest_gateway.http import ApiError

log = logging.getLogger("ingest_gateway")

#: At most this many keys looked up outside the snapshot (unknown ones too) are remembered.
_CACHE_MAX = 10_000
#: A request waits at most this long for a reload of the keys (a frozen database must not stall capture).
_RELOAD_WAIT = 0.25


@dataclass(frozen=True)
class Caller:
    """A verified key as the gateway uses it."""

    id: str
    scopes: frozenset[str]
    customer_id: str | None
    events_per_second: float
    requests_per_second: float


class Bucket:
    """A token bucket holding at most one second of its rate."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self, n: float) -> float:
        """Take ``n`` tokens and return 0, or take nothing and return the seconds to wait.

        A request larger than the bucket is admitted when the bucket is full (it then runs into debt),
        so a batch bigger than one second's rate is slowed down, never refused forever."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(n, self.rate)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


@dataclass
class Access:
    """The gateway's view of the keys: a snapshot of every active key, reloaded when older than ``ttl``
    seconds (so a revocation takes effect within it), plus one-off lookups of keys created since.

    Requests never wait long for PostgreSQL: a reload is awaited at most :data:`_RELOAD_WAIT`; while
    the database does not answer, the last snapshot stays in use. Each key's rate buckets live here too.
    """

    ttl: float
    snapshot: dict[str, Caller] = field(default_factory=dict)
    loaded_at: float = -math.inf
    retry_at: float = 0.0
    misses: dict[str, tuple[float, Caller | None]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    requests: dict[str, Bucket] = field(default_factory=dict)
    events: dict[str, Bucket] = field(default_factory=dict)
    calls: Dependency = field(default_factory=lambda: Dependency("postgres"))
    reloading: asyncio.Future[None] | None = None

    async def caller(self, gw: Gateway, secret: str) -> Caller | None:
        """The active key ``secret`` is, or None."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        if now - self.loaded_at > self.ttl and now >= self.retry_at:
            await self._reload(gw)
        found = self.snapshot.get(digest)
        if found is None:
            hit = self.misses.get(digest)
            if hit is not None and hit[0] > now:
                found = hit[1]
            else:
                found = await self._lookup(gw, digest)
                if len(self.misses) >= _CACHE_MAX:
                    self.misses.clear()
                self.misses[digest] = (now + self.ttl, found)
        if found is not None:
            self.used.add(found.id)
        return found

    async def load(self, gw: Gateway) -> None:
        """Load the snapshot (at start: the keys work even if PostgreSQL stops answering later)."""
        await self._reload(gw, wait=DEPENDENCY_TIMEOUT)

    async def _reload(self, gw: Gateway, wait: float = 0.0) -> None:
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.ensure_future(self._fetch(gw))
        done, _ = await asyncio.wait({self.reloading}, timeout=wait or _RELOAD_WAIT)
        if not done:
            self.retry_at = time.monotonic() + 1.0  # keep the last snapshot meanwhile

    async def _fetch(self, gw: Gateway) -> None:
        used, self.used = list(self.used), set()
        try:
            rows = await self.calls.call(lambda: _load_keys(gw, used))
        except Exception as exc:
            self.used.update(used)
            self.retry_at = time.monotonic() + 1.0
            log.warning("cannot reload API keys (keeping the last ones): %s", exc)
            return
        self.snapshot = {r[0]: Caller(r[1], frozenset(r[2]), r[3], float(r[4]), float(r[5])) for r in rows}
        self.misses.clear()
        self.loaded_at = time.monotonic()

    async def _lookup(self, gw: Gateway, digest: str) -> Caller | None:
        """A key not in the snapshot (created since it was loaded)."""
        try:
            rows = await self.calls.call(
                lambda: gw.query(
                    f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL",
                    {"h": digest},
                )
            )
        except (NoAnswer, ApiError) as exc:
            raise ApiError(503, "Keys cannot be verified: the database does not answer. Retry shortly.",
                           headers={"Retry-After": "2"}) from exc  # fmt: skip
        if not rows or not hmac.compare_digest(rows[0][0], digest):
            return None
        r = rows[0]
        return Caller(r[1], frozenset(r[2]), r[3], float(r[4]), float(r[5]))

    def take_request(self, caller: Caller) -> float:
        bucket = self.requests.get(caller.id)
        if bucket is None or bucket.rate != caller.requests_per_second:
            bucket = self.requests[caller.id] = Bucket(caller.requests_per_second)
        return bucket.take(1)

    def take_events(self, caller: Caller, n: int) -> float:
        bucket = self.events.get(caller.id)
        if bucket is None or bucket.rate != caller.events_per_second:
            bucket = self.events[caller.id] = Bucket(caller.events_per_second)
        return bucket.take(n)


_KEY_COLUMNS = "key_hash, id, scopes, customer_id, events_per_second, requests_per_second"


async def _load_keys(gw: Gateway, used: list[str]) -> list[Any]:
    """Every active key; stamps the last use of the keys used since the previous load."""
    assert gw.engine is not None
    async with gw.engine.begin() as conn:
        if used:
            await conn.execute(
                text("UPDATE api_keys SET last_used_at = now() WHERE id = ANY(:ids)"), {"ids": used}
            )
        result = await conn.execute(text(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL"))
        return list(result.all())
