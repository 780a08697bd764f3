"""Settings read from the environment (``METER_*``), with the defaults of the embedded platform.

The only reader of ``METER_*`` variables. Every process of the platform (gateway, Dagster daemon and
runs, CLI) reads its settings here, so one variable means the same thing everywhere; nothing is read at
import time: each ``load_*`` function reads the environment when it is called. One typed settings class
per room: :class:`Settings` (the platform), :class:`IngestionSettings` and :class:`DrainSettings`
(ingestion), :class:`StreamLimits` (capture), :class:`QualitySettings` (quality).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)

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
#: Signed webhook deliveries the gateway could not map (kept whole, quarantined by the pipeline).
WEBHOOK_SUBJECT = "meter.gateway.webhook"
#: ``METER_PARTITIONS`` (see meter_platform/capture/partitions.py): at most this many; the gateway
#: publishes partition p's messages on ``meter.gateway.p<p>`` and consumer ``meter-ingest-p<p>`` drains them.
MAX_PARTITIONS = 16
PARTITION_SUBJECT_PREFIX = "meter.gateway.p"


def _env_number(name: str, default: N, kind: type[N], what: str) -> N:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be {what}, got {raw!r}") from exc


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "an integer")


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


def env(name: str) -> str | None:
    """A ``METER_*`` variable as set (None when unset or empty), for settings read in one place only."""
    return os.environ.get(name) or None


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
    # API keys: off only with METER_AUTH=disabled (local experiments); verified keys are cached this
    # long, so a revocation takes effect within it. ``api_key`` is what clients (CLI, demo) send.
    auth_enabled: bool = True
    auth_cache_seconds: float = 5.0
    api_key: str | None = None
    # Group commit (ingest_gateway/group_commit.py): requests of at most this many events share
    # JetStream messages while this many group messages await their ack (0: every request alone).
    group_commit_in_flight: int = 2
    group_commit_max_request_events: int = 10


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
        auth_enabled=_auth_enabled(),
        auth_cache_seconds=_env_float("METER_AUTH_CACHE_SECONDS", 5.0),
        api_key=os.environ.get("METER_API_KEY") or None,
        group_commit_in_flight=max(0, _env_int("METER_GROUP_COMMIT_IN_FLIGHT", 2)),
        group_commit_max_request_events=max(1, _env_int("METER_GROUP_COMMIT_MAX_REQUEST_EVENTS", 10)),
    )


def _auth_enabled() -> bool:
    raw = (os.environ.get("METER_AUTH") or "enabled").strip().lower()
    if raw not in ("enabled", "disabled"):
        raise SystemExit(f"METER_AUTH must be enabled or disabled, got {raw!r}")
    return raw == "enabled"


def require_url(value: str | None, name: str) -> str:
    """Return a configured URL or stop with a message that says how to set it."""
    if not value:
        raise RuntimeError(
            f"{name} is not set: start the platform with `meter up` (which sets it), "
            f"or export {name} to point at your server."
        )
    return value


@dataclass(frozen=True)
class DrainSettings:
    """How a run drains the stream; the defaults are those of the Dagster ingestion job."""

    batch_size: int = 500  # messages per fetch; a gateway message carries up to thousands of events
    fetch_timeout: float = 1.0  # seconds to wait for the first message of a batch
    max_seconds: float = 300.0  # the run's time budget: the next run picks up after it
    idle_seconds: float = 60.0  # keep polling this long after the last event: freshness in seconds
    heartbeat_seconds: float = 5.0  # how often a draining run proves it is alive (see IngestionSettings)


@dataclass(frozen=True)
class IngestionSettings:
    """Limits of the micro-batch pipeline and of the runs that drive it."""

    max_lateness: timedelta = timedelta(days=35)  # older events are quarantined as too_late
    max_ingest_runs: int = 2  # runs that may drain at once (dagster.yaml's tag limit enforces it too)
    scale_out_backlog: int = 2000  # with one run draining, start a second above this many waiting messages
    # A STARTED run whose drain has not written its heartbeat (every DrainSettings.heartbeat_seconds)
    # for this long, and that started longer ago than the grace, is dead: the sensor fails it.
    run_stale_seconds: float = 60.0
    run_start_grace_seconds: float = 120.0
    # Keep one run draining even when nothing waits (0: runs only while events wait), each for this long:
    # fresh events then skip a run launch (10-25 s). See meter_platform/ingestion/runs.py.
    warm_runs: int = 1
    warm_run_seconds: float = 1800.0


def load_ingestion_settings() -> IngestionSettings:
    """``METER_MAX_LATENESS_DAYS``, ``METER_MAX_INGEST_RUNS``, ``METER_SCALE_OUT_BACKLOG``,
    ``METER_RUN_STALE_SECONDS``, ``METER_RUN_START_GRACE_SECONDS``, ``METER_WARM_RUNS`` (0 or 1),
    ``METER_WARM_RUN_SECONDS``."""
    return IngestionSettings(
        max_lateness=timedelta(days=_env_float("METER_MAX_LATENESS_DAYS", 35)),
        max_ingest_runs=_env_int("METER_MAX_INGEST_RUNS", 2),
        scale_out_backlog=_env_int("METER_SCALE_OUT_BACKLOG", 2000),
        run_stale_seconds=_env_float("METER_RUN_STALE_SECONDS", 60),
        run_start_grace_seconds=_env_float("METER_RUN_START_GRACE_SECONDS", 120),
        warm_runs=min(1, max(0, _env_int("METER_WARM_RUNS", 1))),
        warm_run_seconds=max(120.0, _env_float("METER_WARM_RUN_SECONDS", 1800)),
    )


@dataclass(frozen=True)
class StreamLimits:
    """Size limits of the events stream (-1: unlimited); a full stream refuses publishes (503)."""

    max_bytes: int = -1
    max_msgs: int = -1


def load_stream_limits() -> StreamLimits:
    """``METER_STREAM_MAX_BYTES``, ``METER_STREAM_MAX_MSGS``."""
    return StreamLimits(
        max_bytes=_env_int("METER_STREAM_MAX_BYTES", -1), max_msgs=_env_int("METER_STREAM_MAX_MSGS", -1)
    )


def load_partitions() -> int:
    """``METER_PARTITIONS``: the stream's partitions by customer, each drained by its own consumer and
    runs (1 to 16; default 1, unpartitioned). ``meter up`` applies a change (see
    meter_platform/capture/partitions.py)."""
    partitions = _env_int("METER_PARTITIONS", 1)
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise SystemExit(f"METER_PARTITIONS must be between 1 and {MAX_PARTITIONS}, got {partitions}")
    return partitions


def load_stream_replicas() -> int:
    """``METER_STREAM_REPLICAS``: copies of the events stream in a NATS cluster (1, 3 or 5; default 1).

    With 3, the stream survives losing any one node; a single nats-server takes only 1.
    """
    replicas = _env_int("METER_STREAM_REPLICAS", 1)
    if not 1 <= replicas <= 5:
        raise SystemExit(f"METER_STREAM_REPLICAS must be between 1 and 5 (JetStream's limit), got {replicas}")
    return replicas


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the data-quality checks (environment: ``METER_QUALITY_*``)."""

    lookback: timedelta = timedelta(hours=48)  # how far back reconciliation and ranges look
    closed_after: timedelta = timedelta(minutes=1)  # a minute window is closed this long after it ends
    freshness: timedelta = timedelta(hours=1)
    max_quarantine_rate: float = 0.05
    max_duplicate_rate: float = 0.20
    volume_factor: float = 3.0  # today vs the trailing daily mean: outside [mean/f, mean*f] is an anomaly
    volume_min_days: int = 3
    max_backlog_age: timedelta = timedelta(minutes=5)  # the oldest event waiting in JetStream, at most

    @classmethod
    def from_env(cls) -> QualitySettings:
        """Read overrides from the environment."""
        return cls(
            lookback=timedelta(hours=_env_float("METER_QUALITY_LOOKBACK_HOURS", 48)),
            freshness=timedelta(minutes=_env_float("METER_QUALITY_FRESHNESS_MINUTES", 60)),
            max_quarantine_rate=_env_float("METER_QUALITY_MAX_QUARANTINE_RATE", 0.05),
            max_duplicate_rate=_env_float("METER_QUALITY_MAX_DUPLICATE_RATE", 0.20),
            volume_factor=_env_float("METER_QUALITY_VOLUME_FACTOR", 3),
            max_backlog_age=timedelta(minutes=_env_float("METER_QUALITY_MAX_BACKLOG_AGE_MINUTES", 5)),
        )


_ISO_DURATION = re.compile(
    r"^P(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """An ISO 8601 duration without years or months (``PT1H``, ``P2D``, ``PT90M``) or plain seconds."""
    raw = text.strip()
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        pass
    match = _ISO_DURATION.match(raw.upper())
    if not match or raw.upper() in ("P", "PT"):
        raise ValueError(f"{text!r} is not a duration: write seconds (3600) or ISO 8601 (PT1H, P2D)")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return timedelta(
        weeks=parts.get("w", 0), days=parts.get("d", 0), hours=parts.get("h", 0),
        minutes=parts.get("m", 0), seconds=parts.get("s", 0),
    )  # fmt: skip


@dataclass(frozen=True)
class BillingSettings:
    """Billing: how long after a period ends its invoices may be finalized (late events still count)."""

    grace: timedelta = timedelta(hours=1)


def load_billing_settings() -> BillingSettings:
    """``METER_BILLING_GRACE``: an ISO 8601 duration (``PT1H``) or seconds; default one hour."""
    raw = os.environ.get("METER_BILLING_GRACE")
    if not raw:
        return BillingSettings()
    try:
        return BillingSettings(grace=parse_duration(raw))
    except ValueError as exc:
        raise SystemExit(f"METER_BILLING_GRACE: {exc}") from exc
