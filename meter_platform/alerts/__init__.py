"""Alerts: failing data-quality checks become notices on the channels of ``alerts.yaml`` — a signed
webhook, the log. No Dagster import; the sensor in ``defs/quality/sensors.py`` calls :func:`evaluate`
then :func:`deliver` on every tick.

What is guaranteed, and where:

1. **One alert per failure episode.** :func:`evaluate` opens an episode when a check's latest outcome
   fails and there is none open (a partial unique index allows one open episode per check), and in the
   same transaction writes one ``alert`` row per channel into the ``alert_deliveries`` outbox. A check
   that keeps failing writes nothing more: UNIQUE (episode, kind, channel) turns a second write into a
   no-op. When the check passes, the episode closes and ``recovery`` rows are written for the channels
   that were alerted, again in one transaction.
2. **Never dropped.** :func:`deliver` sends the outbox's undelivered rows oldest first, per channel in
   order. A webhook that fails is tried a few times within the pass, then left pending with
   ``next_attempt_at`` backing off exponentially, and tried on later ticks until it accepts.
3. **Nothing sent twice on a restart.** ``delivered_at`` commits right after the channel accepted the
   notice, and every piece of state is in those two tables, so a new process finds nothing left to
   send. Only a crash between a receiver's 2xx and that commit sends a notice again (at least once) —
   with the same ``X-Meter-Delivery`` id, on which receivers deduplicate.

Usage thresholds (once billing exists) enter the same way: as :class:`~meter_platform.quality.CheckOutcome`
values passed to :func:`evaluate`.
"""

from meter_platform.alerts.delivery import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryReport,
    deliver,
    sign,
    summarize,
    verify_signature,
)
from meter_platform.alerts.episodes import Evaluation, evaluate
from meter_platform.catalog.alerts import (
    DEFAULT_CHANNELS,
    AlertChannel,
    AlertConfigError,
    alerts_path,
    load_channels,
)

__all__ = [
    "DEFAULT_CHANNELS",
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AlertChannel",
    "AlertConfigError",
    "DeliveryReport",
    "Evaluation",
    "alerts_path",
    "deliver",
    "evaluate",
    "load_channels",
    "sign",
    "summarize",
    "verify_signature",
]
