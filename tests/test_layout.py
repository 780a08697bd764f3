"""The shape of the code: Dagster names users and schedules rely on, and where Dagster may be imported."""

from __future__ import annotations

import ast
from pathlib import Path

from meter_platform.definitions import defs

ROOT = Path(__file__).resolve().parent.parent

#: Every Dagster name the code location defines. Runs, schedules, sensor cursors and asset history in a
#: Dagster instance are keyed by these names: renaming one orphans its history, so a change here must be
#: deliberate (a new name is added to this list in the change that adds it).
DAGSTER_NAMES = {
    "assets": [
        "data_quality_summary",
        "invoice_lines",
        "invoices",
        "jetstream_events",
        "quarantined_events",
        "usage_events",
        "usage_events_archive",
        "usage_minute_aggregates",
    ],
    "asset_checks": [
        "invoices:finalized_only_with_quality_passing",
        "invoices:invoice_totals_equal_their_lines",
        "invoices:one_invoice_per_subscribed_customer",
        "jetstream_events:backlog_age",
        "quarantined_events:quarantine_rate",
        "usage_events:duplicate_rate",
        "usage_events:every_customer_known",
        "usage_events:freshness",
        "usage_events:ingest_ledger_balances",
        "usage_events:ledger_continuity",
        "usage_events:usage_without_subscription",
        "usage_events:values_within_declared_ranges",
        "usage_events_archive:archive_files_readable",
        "usage_events_archive:archive_matches_postgres",
        "usage_minute_aggregates:aggregates_reconcile_with_raw_events",
        "usage_minute_aggregates:no_negative_quantities",
        "usage_minute_aggregates:volume_anomaly",
    ],
    "jobs": [
        "__ASSET_JOB",
        "billing_job",
        "data_quality_job",
        "ingest_microbatch_job",
        "meter_replay_job",
        "usage_events_archive_job",
    ],
    "sensors": ["data_quality_alert_sensor", "jetstream_backlog_sensor", "meter_catalog_sensor"],
    "schedules": ["billing_schedule", "data_quality_job_schedule", "usage_events_archive_schedule"],
    "resources": ["catalog", "nats", "postgres"],
}


def dagster_names() -> dict[str, list[str]]:
    """The names the code location defines now, in the shape of DAGSTER_NAMES."""
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    return {
        "assets": sorted(k.to_user_string() for k in graph.get_all_asset_keys()),
        "asset_checks": sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys),
        "jobs": sorted(j.name for j in repo.get_all_jobs()),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_every_dagster_name_is_unchanged():
    assert dagster_names() == DAGSTER_NAMES


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_dagster_rooms_import_dagster():
    """Domain logic stays plain Python, testable without Dagster: only defs/ and the root import it."""
    allowed = {ROOT / "meter_platform" / "definitions.py"}
    offenders = []
    for base in ("meter_platform", "ingest_gateway"):
        for path in sorted((ROOT / base).rglob("*.py")):
            if path in allowed or (ROOT / "meter_platform" / "defs") in path.parents:
                continue
            if any(name == "dagster" or name.startswith(("dagster.", "dagster_")) for name in _imports(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
