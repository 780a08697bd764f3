"""Knowing whether the gateway's dependencies work, without hanging on them.

* :class:`Dependency` runs a call to NATS or PostgreSQL within a bound, so ``/readyz`` and
  ``/v1/ingest/status`` answer in about :data:`DEPENDENCY_TIMEOUT` even when a server is frozen.
* :class:`PublishOutcomes` remembers how the last publishes to JetStream went, so ``/readyz`` can
  report that writes fail while the connection looks fine (a full stream or disk).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("ingest_gateway")
T = TypeVar("T")

#: How long /readyz and /v1/ingest/status wait for one dependency before reporting it as not answering.
DEPENDENCY_TIMEOUT = 1.5
#: After a failed publish, /readyz stays 503 until a publish succeeds, or until the stream has room
#: again and this long has passed without a new failure (so an instance taken out of rotation, which
#: gets no publishes, comes back once JetStream looks writable).
PUBLISH_FAILURE_HOLD = 5.0


class NoAnswer(Exception):
    """A dependency did not answer within the bound (or is still busy with a call that did not)."""

    def __init__(self, part: str, reason: str):
        super().__init__(f"{part}: {reason}")
        self.part, self.reason = part, reason


class Dependency:
    """Calls to one dependency that answer within a bound, or raise :class:`NoAnswer`.

    A call that overruns is not cancelled: cancelling a query makes psycopg wait (up to 10 s) for
    the server to cancel it, which a frozen server never does. It is left to finish in the
    background; while it is still waiting, further calls fail at once instead of piling up more
    waiting connections. When the server answers again, the call finishes and the next ones go through.
    """

    def __init__(self, name: str):
        self.name = name
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> monotonic start

    async def call(self, make: Callable[[], Awaitable[T]], timeout: float = DEPENDENCY_TIMEOUT) -> T:
        """Run ``make()`` and return its result, or raise NoAnswer after ``timeout`` seconds."""
        now = time.monotonic()
        stuck = [started for started in self._running.values() if now - started > timeout]
        if stuck:
            raise NoAnswer(self.name, f"no answer for {now - min(stuck):.1f} s")
        task = asyncio.ensure_future(make())
        self._running[task] = now
        task.add_done_callback(self._finished)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise NoAnswer(self.name, f"no answer within {timeout:g} s")
        return task.result()

    def _finished(self, task: asyncio.Task[Any]) -> None:
        started = self._running.pop(task, None)
        if not task.cancelled() and task.exception() is not None and started is not None:
            log.debug(
                "%s call failed after %.1f s: %r", self.name, time.monotonic() - started, task.exception()
            )

    def cancel_all(self) -> None:
        """At shutdown: stop waiting for calls that are still running."""
        for task in list(self._running):
            task.cancel()


class PublishOutcomes:
    """How the last publishes to JetStream went (recorded by the publish path, read by /readyz)."""

    def __init__(self) -> None:
        self.last_ok: float | None = None  # monotonic
        self.last_failure: float | None = None
        self.reason = ""
        self.failures = 0  # since the last success

    def succeeded(self) -> None:
        self.last_ok = time.monotonic()
        self.failures = 0

    def failed(self, reason: str) -> None:
        self.last_failure = time.monotonic()
        self.reason = reason
        self.failures += 1

    @property
    def failing(self) -> bool:
        """The most recent publish outcome is a failure."""
        return self.last_failure is not None and (self.last_ok is None or self.last_ok < self.last_failure)

    def seconds_since_failure(self) -> float:
        return time.monotonic() - self.last_failure if self.last_failure is not None else float("inf")

    def describe(self) -> str:
        return f"{self.failures} publish(es) failed, the last {self.seconds_since_failure():.1f} s ago: {self.reason}"
