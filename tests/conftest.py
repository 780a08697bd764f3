"""Real servers for the whole session: nats-server (JetStream, fsync) and PostgreSQL, from the wheels,
on free ports in temporary folders. Each test starts from an empty stream and empty tables."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError, ServerError

from ingest_gateway.app import create_app
from meter_platform.capture import jetstream
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR, STREAM_NAME, Settings
from meter_platform.meters.rebuild import sync_meters
from meter_platform.runtime.servers import Server, start_nats, start_postgres
from meter_platform.storage import db
from tests.helpers import ADMIN_KEY, ADMIN_KEY_ID, serve

TABLES = (
    "usage_minute_aggregates",
    "usage_hour_aggregates",
    "usage_day_aggregates",
    "usage_events",
    "event_ids",
    "quarantined_events",
    "ingest_messages",
    "ingest_batches",
    "meter_definitions",
    "meter_replays",
    "quality_check_results",
    "quarantine_replays",
    "invoice_lines",
    "invoices",
    "invoice_numbers",
    "subscriptions",
    "customers",
    "audit_log",
)


@dataclass
class NatsHandle:
    """The session's nats-server, restartable on the same port and store."""

    store: Path
    server: Server

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        """Stop the server and start it again on the same port, from the same file store."""
        port = int(self.url.rsplit(":", 1)[1])
        self.server.stop()
        self.server = start_nats(self.store, port=port)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsHandle]:
    """A real nats-server with JetStream on a free port, file store in a temp dir."""
    store = tmp_path_factory.mktemp("nats")
    handle = NatsHandle(store, start_nats(store))
    yield handle
    handle.server.stop()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real PostgreSQL on a free port, fresh cluster in a temp dir."""
    server = start_postgres(tmp_path_factory.mktemp("pg") / "data", databases=("meter",))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(pg_server: Server) -> str:
    """The platform database, migrated."""
    db.migrate(pg_server.url)
    return pg_server.url


@pytest.fixture(scope="session")
def admin_key(database_url: str) -> str:
    """The admin API key the tests' clients send (tests.helpers.AUTH), stored once per session."""
    from meter_platform.access import hash_key

    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO api_keys (id, key_hash, prefix, name, scopes, events_per_second, requests_per_second)"
            " VALUES (%s, %s, %s, 'tests', ARRAY['admin'], 1e9, 1e9) ON CONFLICT (id) DO NOTHING",
            (ADMIN_KEY_ID, hash_key(ADMIN_KEY), ADMIN_KEY[:12]),
        )
    return ADMIN_KEY


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The package's example catalog."""
    return load_catalog(EXAMPLE_CATALOG_DIR)


async def _reset_stream(url: str) -> None:
    nc = await jetstream.connect(url, name="tests")
    try:
        js = nc.jetstream()
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(STREAM_NAME)
        # nats-server may still be removing the deleted stream's files: creating it again right away
        # can fail with "error creating store for stream" (err_code 10049). Try again shortly.
        for attempt in range(20):
            try:
                await jetstream.ensure_stream_and_consumer(js)
                return
            except ServerError as exc:
                if exc.err_code != 10049 or attempt == 19:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


@pytest.fixture
def clean(nats_server: NatsHandle, database_url: str, catalog: Catalog) -> None:
    """An empty stream with its consumer, empty tables, and the example catalog's meters active."""
    asyncio.run(_reset_stream(nats_server.url))
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        conn.execute("DELETE FROM api_keys WHERE id <> %s", (ADMIN_KEY_ID,))
        sync_meters(conn, catalog)


@pytest.fixture
def settings(
    nats_server: NatsHandle,
    database_url: str,
    tmp_path: Path,
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """Settings pointing at the session's servers; ``meter`` commands and the demo send the admin key."""
    monkeypatch.setenv("METER_API_KEY", admin_key)
    return Settings(nats_url=nats_server.url, database_url=database_url, data_dir=tmp_path / ".meter")


@pytest.fixture
def gateway_url(settings, catalog, clean) -> Iterator[str]:
    """The real gateway app served by uvicorn in a background thread on a free port."""
    with serve(create_app(settings, catalog)) as url:
        yield url
