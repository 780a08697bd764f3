"""Health checks of the embedded servers, for the supervisor (:mod:`meter_platform.runtime.supervisor`).

NATS can be running and still refuse every event. Seen on a full disk: once a write of the events
stream's file store failed ("no space left on device"), nats-server (2.x, single server) logs a
*critical write error* and fails every later write of that stream, even after space was freed, until it
is restarted; JetStream itself still answers (account and stream info look fine), so only its log tells.
Elsewhere, running out of resources makes it disable JetStream ("will be DISABLED"), after which the
JetStream API does not answer. :class:`JetStreamHealth` notices both and asks for a restart: right away
when JetStream is unavailable, once the disk has room again after a write error.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from nats.errors import NoRespondersError
from nats.js.errors import APIError, ServiceUnavailableError

from meter_platform.capture import jetstream
from meter_platform.runtime.servers import Server

#: Lines of the nats-server log that mean JetStream can no longer store events.
WRITE_FAILURES = ("critical write error", "will be disabled")
#: After a write error, restart once the store's file system has this much room (or a tenth of its size).
MIN_FREE_BYTES = 64 * 1024 * 1024


class JetStreamHealth:
    """The supervisor's health check of an embedded nats-server (a callable: reason to restart, or None)."""

    def __init__(
        self,
        store_dir: Path,
        log: Path,
        say: Callable[[str], None],
        min_free_bytes: int = MIN_FREE_BYTES,
        unavailable_probes: int = 2,
    ) -> None:
        self.store_dir = store_dir
        self.say = say
        self.min_free_bytes = min_free_bytes
        self.unavailable_probes = unavailable_probes
        self._offset = log.stat().st_size if log.exists() else 0  # only lines written from now on
        self._failed_pid: int | None = None  # the process whose log reported a write failure
        self._failure = ""
        self._waiting_said = False
        self._unavailable = 0

    def __call__(self, server: Server) -> str | None:
        pid = server.process.pid
        if self._failed_pid is not None and self._failed_pid != pid:
            self._failed_pid, self._waiting_said = None, False  # restarted since
        failure = self._new_failure(server.log)
        if failure is not None and self._failed_pid is None:
            self._failed_pid, self._failure = pid, failure
        if self._failed_pid is not None:
            return self._after_write_failure()
        reason = _jetstream_unavailable(server.url)
        self._unavailable = self._unavailable + 1 if reason else 0
        if reason and self._unavailable >= self.unavailable_probes:
            self._unavailable = 0
            return reason
        return None

    def _after_write_failure(self) -> str | None:
        usage = shutil.disk_usage(self.store_dir)
        needed = min(self.min_free_bytes, usage.total // 10)
        if usage.free < needed:
            if not self._waiting_said:
                self._waiting_said = True
                self.say(
                    f"nats cannot write its JetStream store ({self._failure}); it is restarted once "
                    f"{self.store_dir} has {needed / 2**20:.1f} MiB free (now {usage.free / 2**20:.1f} MiB)"
                )
            return None
        return f"failed to write its JetStream store ({self._failure}) and has room again"

    def _new_failure(self, log: Path) -> str | None:
        try:
            with open(log, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return None
        end = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            if any(marker in line.lower() for marker in WRITE_FAILURES):
                return line.split("] ", 2)[-1].strip()  # without the pid and time stamp
        return None


def _jetstream_unavailable(url: str) -> str | None:
    """Why JetStream does not serve (None: it answers, or the server is not reachable at all)."""

    async def probe() -> str | None:
        try:
            nc = await jetstream.connect(url, name="meter-up-health", max_reconnect_attempts=0)
        except Exception:
            return None  # not listening (yet): the process check covers a dead server
        try:
            await nc.jetstream().account_info()
        except (NoRespondersError, ServiceUnavailableError) as exc:
            return f"does not serve JetStream ({type(exc).__name__})"
        except APIError as exc:
            if exc.code == 503:
                return f"does not serve JetStream ({exc.description})"
        except Exception:
            return None
        finally:
            await nc.close()
        return None

    return asyncio.run(probe())
