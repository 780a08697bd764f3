"""Data quality: the checks that guard the usage data, as plain functions (no Dagster import).

``registry`` names every check with its asset and severity; ``sql_checks`` and ``expectations``
(great-expectations, imported only inside its checks) evaluate them; ``outcomes`` records the results
and says which failures block invoice finalization.
"""

from meter_platform.config import QualitySettings
from meter_platform.quality.backlog import backlog_age
from meter_platform.quality.expectations import catalog_customers, expectation_checks
from meter_platform.quality.outcomes import blocking_failures, latest_outcomes, record
from meter_platform.quality.registry import BLOCKING_CHECKS, CHECKS, CheckOutcome, CheckSpec
from meter_platform.quality.sql_checks import (
    freshness,
    ingest_rates,
    ledger_continuity,
    reconcile_aggregates,
    usage_without_subscription,
    volume_anomaly,
)

__all__ = [
    "BLOCKING_CHECKS",
    "CHECKS",
    "CheckOutcome",
    "CheckSpec",
    "QualitySettings",
    "backlog_age",
    "blocking_failures",
    "catalog_customers",
    "expectation_checks",
    "freshness",
    "ingest_rates",
    "latest_outcomes",
    "ledger_continuity",
    "reconcile_aggregates",
    "record",
    "usage_without_subscription",
    "volume_anomaly",
]
