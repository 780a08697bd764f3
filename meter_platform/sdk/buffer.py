"""The bounded, thread-safe buffer between ``track`` and the flushers.

An event stays counted in the buffer until the gateway has accepted it (or refused it for good): a
batch being sent is "in flight", still taking room, and a batch that could not be delivered goes back
to the front, in order. So the buffer's bound holds however long the gateway is away, and ``track``
on a full buffer waits for room, then raises :class:`~meter_platform.sdk.errors.BufferFull` — an
event is never dropped to make room.

Each event gets a sequence number when it is queued, so ``flush()`` can wait for exactly the events
tracked before it was called, however busy other threads keep the buffer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from meter_platform.sdk.errors import BufferFull
from meter_platform.sdk.events import Encoded


class EventBuffer:
    """Queued events (with the time each is due and its sequence number) and those in flight."""

    def __init__(self, max_events: int):
        if max_events < 1:
            raise ValueError("max_buffer must be at least 1")
        self.max_events = max_events
        self._queued: deque[tuple[float, int, Encoded]] = deque()
        self._inflight: dict[int, int] = {}  # id() of an event taken by a flusher -> its sequence number
        # Sequence numbers of events not settled yet, oldest first (a dict keeps insertion order).
        self._unsettled: dict[int, None] = {}
        self._last_seq = 0
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
        return len(self._inflight)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event queued so far."""
        return self._last_seq

    def __len__(self) -> int:
        return len(self._unsettled)

    def settled_through(self, seq: int) -> bool:
        """Has every event up to sequence number ``seq`` been accepted or refused for good?"""
        with self.changed:
            return not self._unsettled or next(iter(self._unsettled)) > seq

    def _append(self, event: Encoded) -> None:
        self._last_seq += 1
        self._unsettled[self._last_seq] = None
        self._queued.append((time.monotonic(), self._last_seq, event))
        self.changed.notify_all()

    def _after(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def offer(self, event: Encoded) -> bool:
        """Queue the event if there is room; False (nothing queued) when the buffer is full."""
        with self.changed:
            if len(self) >= self.max_events:
                return False
            self._append(event)
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
            self._append(event)
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
            batch = []
            for _ in range(min(n, len(self._queued))):
                _, seq, event = self._queued.popleft()
                self._inflight[id(event)] = seq
                batch.append(event)
        return batch

    def done(self, events: list[Encoded]) -> None:
        """In-flight events were accepted (or refused for good): their room is free."""
        with self.changed:
            for event in events:
                del self._unsettled[self._inflight.pop(id(event))]
            self.changed.notify_all()
        self._after()

    def requeue(self, events: list[Encoded], due_now: bool = False) -> None:
        """In-flight events that could not be delivered go back to the front, in their order.

        They are due again after the flush interval (a pause before the next round of retries), or at
        once with ``due_now`` (events of a batch split after a refusal, which may well go through).
        """
        due = float("-inf") if due_now else time.monotonic()
        with self.changed:
            back = [(due, self._inflight.pop(id(e)), e) for e in events]
            self._queued.extendleft(reversed(back))
            self.changed.notify_all()
        self._after()

    def snapshot(self) -> list[Encoded]:
        """The queued events (not those in flight), oldest first."""
        with self.changed:
            return [e for _, _, e in self._queued]
