"""Resources: one per outside system, configured from the environment (``EnvVar``), so the same
assets and sensors run against the embedded servers, a production cluster or a test server."""

import asyncio
from pathlib import Path

from dagster import ConfigurableResource

from meter_platform.capture import jetstream
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR


class NatsResource(ConfigurableResource):
    """NATS with JetStream, where accepted events wait until they are committed."""

    url: str

    def backlog(self) -> jetstream.Backlog:
        """Stream and consumer state (creates them if this is the first process to look)."""

        async def read() -> jetstream.Backlog:
            nc = await jetstream.connect(self.url, name="meter-sensor", max_reconnect_attempts=0)
            try:
                js = nc.jetstream()
                await jetstream.ensure_stream_and_consumer(js)
                return await jetstream.backlog(js)
            finally:
                await nc.close()

        return asyncio.run(read())


class PostgresResource(ConfigurableResource):
    """The platform's PostgreSQL database (events, aggregates, ledger)."""

    url: str


class CatalogResource(ConfigurableResource):
    """The folder holding meters.yaml and events.yaml (empty: the package's example catalog)."""

    catalog_dir: str = ""

    def load(self) -> Catalog:
        """Load and check the catalog."""
        return load_catalog(Path(self.catalog_dir) if self.catalog_dir else EXAMPLE_CATALOG_DIR)
