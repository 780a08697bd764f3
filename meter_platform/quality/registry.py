"""Every data-quality check by name: the asset it guards, its severity, whether it blocks invoices.

The one list of checks. The plain functions that evaluate them, the Dagster asset-check specs and the
README's table all take a check's asset and severity from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check evaluation."""

    check_name: str
    asset: str
    passed: bool
    severity: str  # "ERROR" or "WARN"
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckSpec:
    """A data-quality check: what it guards and how much its failure matters."""

    name: str
    asset: str
    severity: str  # "ERROR" or "WARN"
    description: str
    blocks_invoices: bool = False  # a failing ERROR of this check blocks finalizing invoices


CHECKS: dict[str, CheckSpec] = {
    spec.name: spec
    for spec in (
        CheckSpec(
            "aggregates_reconcile_with_raw_events",
            "usage_minute_aggregates",
            "ERROR",
            "closed minute windows of the aggregates equal a recomputation from raw events",
            blocks_invoices=True,
        ),
        CheckSpec(
            "no_negative_quantities",
            "usage_minute_aggregates",
            "ERROR",
            "no negative counts or sums in the aggregates (great-expectations)",
        ),
        CheckSpec(
            "volume_anomaly",
            "usage_minute_aggregates",
            "WARN",
            "today's volume per meter within a factor of the trailing daily mean",
        ),
        CheckSpec(
            "ledger_continuity",
            "usage_events",
            "ERROR",
            "every stream sequence up to the consumer's ack floor is in the ledger",
            blocks_invoices=True,
        ),
        CheckSpec(
            "values_within_declared_ranges",
            "usage_events",
            "ERROR",
            "stored values within the min/max that events.yaml declares (great-expectations)",
        ),
        CheckSpec("freshness", "usage_events", "WARN", "events arrived within the freshness window"),
        CheckSpec("duplicate_rate", "usage_events", "WARN", "share of duplicates in the last 24 h"),
        CheckSpec(
            "every_customer_known",
            "usage_events",
            "WARN",
            "every customer with usage is a known customer (great-expectations)",
        ),
        CheckSpec(
            "backlog_age",
            "jetstream_events",
            "ERROR",
            "the oldest event waiting in JetStream waited at most METER_QUALITY_MAX_BACKLOG_AGE_MINUTES (5)",
        ),
        CheckSpec(
            "usage_without_subscription",
            "usage_events",
            "WARN",
            "every customer with recent usage has a subscription covering it (else it is never billed)",
        ),
        CheckSpec(
            "quarantine_rate", "quarantined_events", "WARN", "share of quarantined events in the last 24 h"
        ),
    )
}

#: Checks whose failure (severity ERROR) blocks finalizing invoices.
BLOCKING_CHECKS = tuple(name for name, spec in CHECKS.items() if spec.blocks_invoices)


def outcome(
    name: str, passed: bool, description: str, metadata: dict[str, Any] | None = None
) -> CheckOutcome:
    """An outcome of the named check, with its asset and severity from the registry."""
    spec = CHECKS[name]
    return CheckOutcome(name, spec.asset, passed, spec.severity, description, metadata or {})
