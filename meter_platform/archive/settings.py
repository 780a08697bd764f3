"""Settings of the archive: how many days stay hot in PostgreSQL, where the files go, how long they stay.

Read from the environment through :mod:`meter_platform.config` (``env``) when called, never at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from meter_platform.config import env, project_root

#: The fewest days that stay hot whatever ``METER_HOT_DAYS`` says: yesterday and today are never
#: archived. Readers rely on it: a range that starts at or after yesterday 00:00 UTC cannot reach an
#: archived day, so the usage queries over recent time never look at the archive.
MIN_HOT_DAYS = 1


@dataclass(frozen=True)
class ArchiveSettings:
    """``hot_days``: days kept in PostgreSQL (older day partitions are archived); ``url``: the archive's
    root (a local folder, or ``s3://bucket/prefix`` through fsspec); ``retention_days``: archive files
    of days older than this are deleted (None: kept forever)."""

    hot_days: int
    url: str
    retention_days: int | None = None

    def cutoff(self, today: date | None = None) -> date:
        """Days before this one are eligible for archiving."""
        today = today or datetime.now(UTC).date()
        return today - timedelta(days=self.hot_days)

    def retention_cutoff(self, today: date | None = None) -> date | None:
        """Archived days before this one are deleted (None: never)."""
        if self.retention_days is None:
            return None
        return (today or datetime.now(UTC).date()) - timedelta(days=self.retention_days)


def _int(name: str, default: int | None, minimum: int) -> int | None:
    raw = env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}, got {value}")
    return value


def default_archive_url() -> str:
    """``.meter/archive`` beside the embedded servers' data."""
    return str(project_root() / ".meter" / "archive")


def load_archive_settings() -> ArchiveSettings:
    """``METER_HOT_DAYS`` (default 40, at least 1), ``METER_ARCHIVE_URL`` (default ``.meter/archive``),
    ``METER_RETENTION_DAYS`` (default unset: keep forever; it must exceed the hot days)."""
    hot = _int("METER_HOT_DAYS", 40, MIN_HOT_DAYS)
    assert hot is not None
    retention = _int("METER_RETENTION_DAYS", None, 1)
    if retention is not None and retention <= hot:
        raise SystemExit(f"METER_RETENTION_DAYS ({retention}) must be more than METER_HOT_DAYS ({hot})")
    return ArchiveSettings(
        hot_days=hot, url=env("METER_ARCHIVE_URL") or default_archive_url(), retention_days=retention
    )
