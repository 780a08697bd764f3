"""The raw-event archive as a daily-partitioned asset: a partition (a UTC day, ``YYYY-MM-DD``) is
materialized when that day's raw events are in Parquet files under METER_ARCHIVE_URL and no longer in
PostgreSQL. Thin: :mod:`meter_platform.archive` does the work; this reports it (metadata, checks)."""

from datetime import date

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    DailyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from meter_platform.archive import apply_retention, archive_day, load_archive_settings
from meter_platform.archive.archiver import ArchiveMismatch, DayArchive
from meter_platform.archive.verify import check_files
from meter_platform.defs.resources import PostgresResource
from meter_platform.storage import db

#: UTC days, keyed ``YYYY-MM-DD``, up to yesterday (a day is archived only once it is METER_HOT_DAYS old).
DAILY = DailyPartitionsDefinition(start_date="2025-01-01", timezone="UTC")
MATCHES = "archive_matches_postgres"
READABLE = "archive_files_readable"


def _result(context: AssetExecutionContext, done: DayArchive | None, files) -> MaterializeResult:
    """Metadata of the day's archive, the verification of a part written now, the files read back."""
    metadata = {
        "day": context.partition_key,
        "parts": len(files),
        "rows": sum(f.rows for f in files),
        "bytes": sum(f.bytes for f in files),
        "paths": MetadataValue.json([f.path for f in files]),
    }
    checks = [
        AssetCheckResult(
            asset_key=AssetKey("usage_events_archive"),
            check_name=READABLE,
            passed=all(f.problem is None for f in files),
            severity=AssetCheckSeverity.ERROR,
            description="each part file reads back with DuckDB, zstd-compressed, rows and checksum as recorded",
            metadata={
                "problems": MetadataValue.json([f"part {f.part}: {f.problem}" for f in files if f.problem])
            },
        )
    ]
    if done is not None and done.verification is not None:
        v = done.verification
        metadata |= {
            "part_written": done.part,
            "path": done.path or "",
            "rows_written": done.rows,
            "bytes_written": done.bytes,
            "postgres_table_bytes": done.table_bytes,
            "compression_ratio": done.compression_ratio or 0.0,
            "seconds": round(done.seconds, 2),
        }
        checks.append(
            AssetCheckResult(
                asset_key=AssetKey("usage_events_archive"),
                check_name=MATCHES,
                passed=v.ok,
                severity=AssetCheckSeverity.ERROR,
                description="rows and checksum equal the partition's, ids equal event_ids, meter totals equal the aggregates",
                metadata={
                    "file_rows": v.file_rows,
                    "checksum": v.file_checksum,
                    "ledger_rows": v.ledger_rows,
                    "meters_checked": v.meters_checked,
                },
            )
        )
    return MaterializeResult(
        asset_key=AssetKey("usage_events_archive"), metadata=metadata, check_results=checks
    )


@multi_asset(
    specs=[
        AssetSpec(
            "usage_events_archive",
            deps=["usage_events"],
            group_name="archive",
            kinds={"parquet"},
            skippable=True,
            description="A day's raw events in zstd Parquet under METER_ARCHIVE_URL (usage_events/"
            "day=YYYY-MM-DD/part-N.parquet), verified against the partition, the ledger and the aggregates "
            "before the day's partition was dropped. Days older than METER_HOT_DAYS are eligible.",
        )
    ],
    check_specs=[
        AssetCheckSpec(
            MATCHES, asset="usage_events_archive", description="the file written matches PostgreSQL"
        ),
        AssetCheckSpec(
            READABLE, asset="usage_events_archive", description="the day's files read back as recorded"
        ),
    ],
    partitions_def=DAILY,
    # A day not yet eligible materializes nothing and runs no check: outputs are optional (subsettable).
    can_subset=True,
)
def usage_events_archive(context: AssetExecutionContext, postgres: PostgresResource):
    """Archive the partition's day when eligible (and say why not otherwise), then apply retention."""
    day = date.fromisoformat(context.partition_key)
    settings = load_archive_settings()
    with db.connect(postgres.url, autocommit=True) as conn:
        try:
            done = archive_day(conn, day, settings, progress=context.log.debug)
        except ArchiveMismatch as exc:
            context.log.error(str(exc))
            raise
        context.log.info(done.line())
        files = check_files(conn, day)
        if settings.retention_days is not None:
            for part in apply_retention(conn, settings, actor="dagster"):
                context.log.info(f"retention: {part.day} part {part.part} deleted ({part.rows} events)")
    if done.status == "archived" or files:
        yield _result(context, done if done.status == "archived" else None, files)
    else:
        context.log.info(f"{day}: nothing materialized ({done.status}: {'; '.join(done.problems)})")
