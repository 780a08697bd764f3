"""The backlog-age check: events accepted into JetStream must not wait long for the pipeline.

A stalled ingestion (no run draining: zombie runs holding the run limit, a broken sensor, a daemon that
is down) shows nowhere else until usage is missing from invoices; the age of the oldest event still
waiting in the stream catches it within minutes. Plain function: the caller reads the time.
"""

from __future__ import annotations

from datetime import UTC, datetime

from meter_platform.config import QualitySettings
from meter_platform.quality import registry
from meter_platform.quality.registry import CheckOutcome


def backlog_age(
    oldest_pending: datetime | None, waiting: int, settings: QualitySettings, now: datetime | None = None
) -> CheckOutcome:
    """Passes while the oldest message not yet committed (``oldest_pending``, when JetStream stored it;
    None: the stream is empty) is younger than ``settings.max_backlog_age``."""
    limit = settings.max_backlog_age
    limit_minutes = limit.total_seconds() / 60
    if oldest_pending is None:
        return registry.outcome(
            "backlog_age",
            True,
            "no event waiting in JetStream",
            {"waiting_messages": 0, "limit_minutes": limit_minutes},
        )
    age = (now or datetime.now(UTC)) - oldest_pending
    metadata = {
        "waiting_messages": waiting,
        "oldest_pending_at": oldest_pending.isoformat(),
        "oldest_age_seconds": round(age.total_seconds(), 1),
        "limit_minutes": limit_minutes,
    }
    if age > limit:
        description = (
            f"the oldest of {waiting} events waiting in JetStream has waited {age.total_seconds() / 60:.1f} "
            f"minutes (limit {limit_minutes:g}): ingestion is stalled or falling behind"
        )
        return registry.outcome("backlog_age", False, description, metadata)
    return registry.outcome(
        "backlog_age",
        True,
        f"{waiting} events waiting in JetStream, the oldest for {age.total_seconds():.0f} s",
        metadata,
    )
