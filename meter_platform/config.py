"""Settings read from the environment (``METER_*``), with the defaults of the embedded platform.

Every process of the platform (gateway, Dagster daemon and runs, CLI) reads its settings here, so one
variable means the same thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EXAMPLE_CATALOG_DIR = PACKAGE_DIR / "example_catalog"

#: The JetStream stream that holds every accepted event until the pipeline has committed it.
STREAM_NAME = "METER_EVENTS"
#: Subjects of the stream: ``meter.events.<event_type>`` for direct publishers (the contract),
#: ``meter.gateway.batch`` for the gateway's one-message-per-request batches.
EVENTS_SUBJECT_PREFIX = "meter.events"
GATEWAY_SUBJECT = "meter.gateway.batch"
STREAM_SUBJECTS = [f"{EVENTS_SUBJECT_PREFIX}.>", "meter.gateway.>"]
#: The durable pull consumer the micro-batch job drains.
CONSUMER_NAME = "meter-ingest"
#: Header that marks a message as a gateway batch (value: format version).
BATCH_HEADER = "Meter-Batch"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


def project_root() -> Path:
    """The checkout (or working directory) whose ``.meter/`` holds the embedded servers' data."""
    return Path(os.environ.get("METER_HOME", Path.cwd())).resolve()


@dataclass(frozen=True)
class Settings:
    """Runtime settings; build with :func:`load_settings`."""

    nats_url: str | None
    database_url: str | None
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    dagster_port: int = 3000
    catalog_dir: Path = EXAMPLE_CATALOG_DIR
    max_body_bytes: int = 5 * 1024 * 1024
    data_dir: Path = field(default_factory=lambda: project_root() / ".meter")


def load_settings() -> Settings:
    """Read the ``METER_*`` environment variables (see the README's configuration table)."""
    return Settings(
        nats_url=os.environ.get("METER_NATS_URL") or None,
        database_url=os.environ.get("METER_DATABASE_URL") or None,
        gateway_host=os.environ.get("METER_GATEWAY_HOST", "127.0.0.1"),
        gateway_port=_env_int("METER_GATEWAY_PORT", 8080),
        dagster_port=_env_int("METER_DAGSTER_PORT", 3000),
        catalog_dir=Path(os.environ.get("METER_CATALOG_DIR") or EXAMPLE_CATALOG_DIR),
        max_body_bytes=_env_int("METER_MAX_BODY_BYTES", 5 * 1024 * 1024),
        data_dir=project_root() / ".meter",
    )


def require_url(value: str | None, name: str) -> str:
    """Return a configured URL or stop with a message that says how to set it."""
    if not value:
        raise RuntimeError(
            f"{name} is not set: start the platform with `meter up` (which sets it), "
            f"or export {name} to point at your server."
        )
    return value
