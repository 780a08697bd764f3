"""Long-term storage of raw events: day partitions older than ``METER_HOT_DAYS`` archived to Parquet
(zstd) under ``METER_ARCHIVE_URL``, verified before they are dropped, read back exactly by every
raw-event reader (:mod:`meter_platform.archive.reader`), deleted after ``METER_RETENTION_DAYS``.

Pure code: no Dagster (``meter_platform/defs/archive`` drives it), and pyarrow and DuckDB are only
imported by the functions that read or write files, never on the ingest path.
"""

from meter_platform.archive.archiver import (
    ArchiveMismatch,
    DayArchive,
    archive_day,
    archive_eligible,
    eligible_days,
    summary,
)
from meter_platform.archive.retention import Deleted, apply_retention, expired_parts
from meter_platform.archive.settings import ArchiveSettings, load_archive_settings

__all__ = [
    "ArchiveMismatch",
    "ArchiveSettings",
    "DayArchive",
    "Deleted",
    "apply_retention",
    "archive_day",
    "archive_eligible",
    "eligible_days",
    "expired_parts",
    "load_archive_settings",
    "summary",
]
