"""The bounded, thread-safe buffer between ``track`` and the flushers.

An event stays counted in the buffer until the gateway has accepted it (or refused it for good): a
batch being sent is "in flight", still taking room, and a batch that could not be delivered goes back
to the front, in order. So the buffer's bound holds however long the gateway is away, and ``track``
on a full buffer waits for room, then raises :class:`~meter_platform.sdk.errors.BufferFull` — an
event is never dropped to make room.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from meter_platform.sdk.errors import BufferFull
from meter_platform.sdk.events import Encoded


class EventBuffer:
    """Queued events (with the time each was queued) plus a count of those in flight."""

    def __init__(self, max_events: int):
        if max_events < 1:
            raise ValueError("max_buffer must be at least 1")
        self.max_events = max_events
        self._queued: deque[tuple[float, Encoded]] = deque()
        self._inflight = 0
        self.changed = threading.Condition()
        #: Called (outside the lock) after every change; the async client wakes its tasks with it.
        self.on_change: Callable[[], None] | None = None

    @property
    def queued(self) -> int:
        """Events waiting to be sent."""
        return len(self._queued)

    @property
    def inflight(self) -> int:
        """Events taken by a flusher and not yet accepted or refused."""
        return self._inflight

    def __len__(self) -> int:
        return len(self._queued) + self._inflight

    def _notify(self) -> None:
        self.changed.notify_all()

    def _after(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def offer(self, event: Encoded) -> bool:
        """Queue the event if there is room; False (nothing queued) when the buffer is full."""
        with self.changed:
            if len(self) >= self.max_events:
                return False
            self._queued.append((time.monotonic(), event))
            self._notify()
        self._after()
        return True

    def put(self, event: Encoded, timeout: float | None) -> None:
        """Queue the event, waiting up to ``timeout`` seconds (None: forever) for room; BufferFull after."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self) < self.max_events, timeout):
                raise BufferFull(
                    f"the buffer holds {self.max_events} events (the gateway is slow or away) and had "
                    f"no room within {timeout} s; nothing was dropped, this event was not tracked"
                )
            self._queued.append((time.monotonic(), event))
            self._notify()
        self._after()

    def ready(self, batch_size: int, interval: float) -> bool:
        """Is a batch due: ``batch_size`` events queued, or the oldest one queued ``interval`` ago?"""
        return len(self._queued) >= batch_size or (
            bool(self._queued) and time.monotonic() - self._queued[0][0] >= interval
        )

    def due_in(self, interval: float) -> float:
        """Seconds until the oldest queued event is due (``interval`` when nothing is queued)."""
        if not self._queued:
            return interval
        return max(0.0, interval - (time.monotonic() - self._queued[0][0]))

    def take(self, n: int) -> list[Encoded]:
        """Up to ``n`` queued events, oldest first, now in flight (empty when nothing is queued)."""
        with self.changed:
            batch = [self._queued.popleft()[1] for _ in range(min(n, len(self._queued)))]
            self._inflight += len(batch)
        return batch

    def done(self, n: int) -> None:
        """``n`` in-flight events were accepted (or refused for good): their room is free."""
        with self.changed:
            self._inflight -= n
            self._notify()
        self._after()

    def requeue(self, events: list[Encoded], due_now: bool = False) -> None:
        """In-flight events that could not be delivered go back to the front, in their order.

        They are due again after the flush interval (a pause before the next round of retries), or at
        once with ``due_now`` (events of a batch split after a refusal, which may well go through).
        """
        now = float("-inf") if due_now else time.monotonic()
        with self.changed:
            self._inflight -= len(events)
            self._queued.extendleft((now, e) for e in reversed(events))
            self._notify()
        self._after()

    def snapshot(self) -> list[Encoded]:
        """The queued events (not those in flight), oldest first."""
        with self.changed:
            return [e for _, e in self._queued]
