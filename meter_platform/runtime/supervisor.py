"""Keep the platform's processes running: restart a child that died, or that its health check says
is broken, with backoff, while the others keep serving.

A child is a name, a function that starts it (the same data directory and port every time, so its
clients reconnect to where they were) and optionally a health check. The first restart waits
``first_delay`` seconds; each further one in a row waits twice as long, up to ``max_delay``; a child
that stayed up ``stable_after`` seconds starts again from ``first_delay``. Every death, restart and
failed restart is a log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meter_platform.runtime.servers import Server

#: A health check: a reason to restart the running server, or None while it is healthy.
HealthCheck = Callable[[Server], "str | None"]


@dataclass
class Child:
    """One supervised process and its restart state."""

    name: str
    start: Callable[[], Server]
    server: Server
    check: HealthCheck | None = None
    delay: float = 0.0  # the wait before the next restart
    up_since: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # set while it is down, waiting for its restart
    next_check: float = 0.0
    restarts: int = 0


class Supervisor:
    """Named children, polled by :meth:`run` (or :meth:`poll`, one pass, for tests)."""

    def __init__(
        self,
        say: Callable[[str], None],
        *,
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        check_every: float = 5.0,
    ) -> None:
        self.say = say
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.check_every = check_every
        self.children: list[Child] = []

    def add(
        self,
        name: str,
        start: Callable[[], Server],
        *,
        check: HealthCheck | None = None,
        server: Server | None = None,
    ) -> Server:
        """Supervise ``name``: start it now (an error propagates), or adopt ``server`` already started."""
        running = server if server is not None else start()
        now = time.monotonic()
        self.children.append(
            Child(
                name,
                start,
                running,
                check,
                delay=self.first_delay,
                up_since=now,
                next_check=now + self.check_every,
            )
        )
        return running

    def __getitem__(self, name: str) -> Server:
        return next(c.server for c in self.children if c.name == name)

    @property
    def servers(self) -> list[Server]:
        """The running servers, in the order they were added."""
        return [c.server for c in self.children]

    def poll(self) -> None:
        """One pass: notice dead or unhealthy children, restart those whose wait is over."""
        for child in self.children:
            now = time.monotonic()
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
                continue
            code = child.server.process.poll()
            if code is not None:
                self._down(child, f"exited with code {code}")
                continue
            if child.check is not None and now >= child.next_check:
                child.next_check = now + self.check_every
                reason = child.check(child.server)
                if reason is not None:
                    self._down(child, reason)

    def run(self, interval: float = 1.0) -> None:
        """Poll until interrupted (Ctrl-C raises KeyboardInterrupt out of here)."""
        while True:
            self.poll()
            time.sleep(interval)

    def stop(self) -> None:
        """Stop every child, newest first (the users of a server before the server)."""
        for child in reversed(self.children):
            if child.server.process.poll() is None:
                self.say(f"stopping {child.name}")
            child.server.stop()
        self.children.clear()

    def _down(self, child: Child, reason: str) -> None:
        now = time.monotonic()
        if now - child.up_since >= self.stable_after:
            child.delay = self.first_delay
        # Whatever is left of it (a process group's other members; the process itself when it is
        # unhealthy rather than dead) goes before the restart takes its port and data directory.
        child.server.stop()
        self.say(f"{child.name} {reason}; restarting it in {child.delay:g} s (log: {child.server.log})")
        self._wait(child, now)

    def _wait(self, child: Child, now: float) -> None:
        child.restart_at = now + child.delay
        child.delay = min(child.delay * 2, self.max_delay)

    def _restart(self, child: Child) -> None:
        try:
            child.server = child.start()
        except Exception as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.say(f"{child.name} did not start again ({first_line}); next try in {child.delay:g} s")
            self._wait(child, time.monotonic())
            return
        now = time.monotonic()
        child.restart_at = None
        child.up_since = now
        child.next_check = now + self.check_every
        child.restarts += 1
        where = f" at {child.server.url}" if child.server.url else ""
        self.say(f"{child.name} restarted{where} (restart {child.restarts})")
