"""The SDK's tests against the real gateway: a gateway we can stop and start again on the same port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from ingest_gateway.app import create_app
from meter_platform.catalog import Catalog
from meter_platform.config import Settings
from meter_platform.runtime.servers import free_port
from tests.billing.support import billing_catalog, march, old_events_allowed
from tests.helpers import scalar

__all__ = [
    "GatewayThread",
    "billing_catalog",
    "march",
    "old_events_allowed",
    "restartable_gateway",
    "stored_ids",
]


class GatewayThread:
    """The real gateway app served by uvicorn in a thread, on a fixed port, stoppable and restartable."""

    def __init__(self, settings: Settings, catalog: Catalog, port: int | None = None):
        self.settings, self.catalog = settings, catalog
        self.port = port or free_port()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayThread:
        config = uvicorn.Config(
            create_app(self.settings, self.catalog), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sdk-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(15)
            assert not self.thread.is_alive(), "the gateway did not stop"
        self.server = self.thread = None


@pytest.fixture
def restartable_gateway(settings, catalog, clean) -> Iterator[GatewayThread]:
    """A real gateway on a free port that the test may stop and start again (clean stream and tables)."""
    gateway = GatewayThread(settings, catalog).start()
    yield gateway
    gateway.stop()


def stored_ids(database_url: str) -> int:
    """How many events are in usage_events."""
    return scalar(database_url, "SELECT count(*) FROM usage_events")
