"""Alert delivery: the ``alert_deliveries`` outbox sent to its channels, oldest first, signed, with backoff.

See :mod:`meter_platform.alerts` for the guarantees.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from meter_platform.alerts.episodes import Evaluation
from meter_platform.catalog.alerts import AlertChannel

# The alerts room logs under one name, whichever module of it writes the line.
logger = logging.getLogger("meter_platform.alerts")

SIGNATURE_HEADER = "X-Meter-Signature"
DELIVERY_HEADER = "X-Meter-Delivery"
TIMESTAMP_HEADER = "X-Meter-Timestamp"
EVENT_HEADER = "X-Meter-Event"

#: Tries of one webhook notice within a delivery pass; the pause before the second, doubling after.
QUICK_TRIES = 3
QUICK_BACKOFF_SECONDS = 0.5
#: After a pass's tries all failed, the next pass may try after this long, doubling per failed pass.
RETRY_BACKOFF_SECONDS = 30.0
RETRY_BACKOFF_CAP_SECONDS = 3600.0
#: A pass starts no new send after this long (Dagster gives a sensor tick 60 s by default).
PASS_BUDGET_SECONDS = 30.0
WEBHOOK_TIMEOUT_SECONDS = 5.0
# Any constant works; it only has to be the same in every process that delivers.
_DELIVERY_LOCK = 0x616C657274  # "alert"


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Meter-Signature`` value of a body: ``sha256=<hex HMAC-SHA256 of the exact bytes>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """For receivers: True when ``header`` (``X-Meter-Signature``) signs exactly ``body`` with ``secret``.

    Check it on the raw request body, before parsing the JSON; compare in constant time (done here).
    """
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body), header)


@dataclass(frozen=True)
class DeliveryReport:
    """What one :func:`deliver` pass did, and what is left."""

    alerts_sent: int = 0
    recoveries_sent: int = 0
    failed: int = 0  # notices whose tries in this pass all failed (still pending)
    pending: int = 0  # undelivered notices after the pass, whatever the reason
    busy: bool = False  # another pass held the delivery lock; this one sent nothing
    problems: tuple[str, ...] = ()  # why notices are pending: the channel and its last error


def deliver(
    conn: psycopg.Connection,
    channels: Sequence[AlertChannel],
    *,
    quick_tries: int = QUICK_TRIES,
    quick_backoff: float = QUICK_BACKOFF_SECONDS,
    retry_backoff: float = RETRY_BACKOFF_SECONDS,
    retry_backoff_cap: float = RETRY_BACKOFF_CAP_SECONDS,
    budget_seconds: float = PASS_BUDGET_SECONDS,
    timeout: float = WEBHOOK_TIMEOUT_SECONDS,
) -> DeliveryReport:
    """Send the outbox's undelivered notices that are due, oldest first, in order per channel.

    ``conn`` must be in autocommit mode: each notice's ``delivered_at`` (or its failure and
    ``next_attempt_at``) commits as soon as it is known. A webhook is tried ``quick_tries`` times with
    backoff; if all fail, the notice stays pending, the channel's later notices wait behind it (so a
    recovery never overtakes its alert), and the next pass may try after ``retry_backoff`` seconds,
    doubling per failed pass up to ``retry_backoff_cap``. Passes are serialized by an advisory lock.
    """
    if not conn.autocommit:
        raise ValueError("deliver() needs an autocommit connection: each delivery must commit when known")
    locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (_DELIVERY_LOCK,)).fetchone()
    if not (locked and locked[0]):
        return DeliveryReport(busy=True, pending=_pending(conn))
    try:
        return _deliver_locked(
            conn,
            {c.name: c for c in channels},
            quick_tries=max(1, quick_tries),
            quick_backoff=quick_backoff,
            retry_backoff=retry_backoff,
            retry_backoff_cap=retry_backoff_cap,
            budget_seconds=budget_seconds,
            timeout=timeout,
        )
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_DELIVERY_LOCK,))


def _deliver_locked(
    conn: psycopg.Connection,
    channels: dict[str, AlertChannel],
    *,
    quick_tries: int,
    quick_backoff: float,
    retry_backoff: float,
    retry_backoff_cap: float,
    budget_seconds: float,
    timeout: float,
) -> DeliveryReport:
    started = time.monotonic()
    rows = conn.execute(
        "SELECT delivery_id, kind, channel, payload, attempts, next_attempt_at <= now()"
        " FROM alert_deliveries WHERE delivered_at IS NULL ORDER BY created_at, delivery_id"
    ).fetchall()
    sent = {"alert": 0, "recovery": 0}
    failed = 0
    problems: list[str] = []
    blocked: set[str] = set()  # channels that stop for this pass: not due yet, failing, or unknown
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for delivery_id, kind, channel_name, payload, attempts, due in rows:
            if channel_name in blocked:
                continue
            channel = channels.get(channel_name)
            if channel is None:
                blocked.add(channel_name)
                problems.append(f"{channel_name}: no longer in alerts.yaml; its notices wait for it")
                continue
            if not due or time.monotonic() - started > budget_seconds:
                blocked.add(channel_name)
                continue
            tries, error = _send(client, channel, payload, quick_tries, quick_backoff)
            if error is None:
                _mark_delivered(conn, delivery_id, tries)
                sent[kind] += 1
                continue
            _mark_failed(
                conn,
                delivery_id,
                channel_name,
                attempts + tries,
                error,
                quick_tries=quick_tries,
                retry_backoff=retry_backoff,
                retry_backoff_cap=retry_backoff_cap,
            )
            failed += 1
            blocked.add(channel_name)
            problems.append(f"{channel_name}: {error}")
    return DeliveryReport(
        alerts_sent=sent["alert"],
        recoveries_sent=sent["recovery"],
        failed=failed,
        pending=_pending(conn),
        problems=tuple(problems),
    )


def _mark_delivered(conn: psycopg.Connection, delivery_id: Any, tries: int) -> None:
    conn.execute(
        "UPDATE alert_deliveries SET delivered_at = now(), attempts = attempts + %s,"
        " last_error = NULL WHERE delivery_id = %s",
        (tries, delivery_id),
    )


def _mark_failed(
    conn: psycopg.Connection,
    delivery_id: Any,
    channel_name: str,
    total: int,
    error: str,
    *,
    quick_tries: int,
    retry_backoff: float,
    retry_backoff_cap: float,
) -> None:
    """Record a notice whose tries in this pass all failed (``total`` tries so far) and when the next
    pass may try again: ``retry_backoff`` doubling per failed pass, up to ``retry_backoff_cap``."""
    failed_passes = max(1, -(-total // quick_tries))
    delay = min(retry_backoff_cap, retry_backoff * 2 ** (failed_passes - 1))
    conn.execute(
        "UPDATE alert_deliveries SET attempts = %s, last_error = %s,"
        " next_attempt_at = now() + make_interval(secs => %s) WHERE delivery_id = %s",
        (total, error, delay, delivery_id),
    )
    logger.warning(
        "alert delivery %s to %s failed after %d attempt(s), next try in %.0f s: %s",
        delivery_id,
        channel_name,
        total,
        delay,
        error,
    )


def _pending(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM alert_deliveries WHERE delivered_at IS NULL").fetchone()
    return int(row[0]) if row else 0


def _send(
    client: httpx.Client,
    channel: AlertChannel,
    payload: dict[str, Any],
    quick_tries: int,
    quick_backoff: float,
) -> tuple[int, str | None]:
    """Deliver one notice: ``(tries, None)`` once accepted, ``(tries, last error)`` if every try failed."""
    if channel.type == "log":
        _log_line(payload)
        return 1, None
    error: str | None = None
    for attempt in range(quick_tries):
        if attempt:
            time.sleep(quick_backoff * 2 ** (attempt - 1))
        error = _post(client, channel, payload)
        if error is None:
            return attempt + 1, None
    return quick_tries, error


def _post(client: httpx.Client, channel: AlertChannel, payload: dict[str, Any]) -> str | None:
    assert channel.url is not None and channel.secret is not None
    now = datetime.now(UTC)
    # The send time is part of the signed body, so a receiver can refuse stale replays.
    body = json.dumps(
        {**payload, "sent_at": now.isoformat()}, sort_keys=True, separators=(",", ":"), default=str
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "meter-platform-alerts",
        SIGNATURE_HEADER: sign(channel.secret, body),
        DELIVERY_HEADER: str(payload["delivery_id"]),
        TIMESTAMP_HEADER: str(int(now.timestamp())),
        EVENT_HEADER: str(payload["event"]),
    }
    try:
        response = client.post(channel.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _log_line(payload: dict[str, Any]) -> None:
    where = f"{payload['asset']}/{payload['check']}"
    if payload["event"] == "alert":
        logger.warning(
            "ALERT %s %s: %s (episode %s since %s, delivery %s)",
            payload["severity"],
            where,
            payload["description"],
            payload["episode_id"],
            payload["opened_at"],
            payload["delivery_id"],
        )
    else:
        logger.info(
            "RECOVERED %s: %s (episode %s, %s to %s, delivery %s)",
            where,
            payload["description"],
            payload["episode_id"],
            payload["opened_at"],
            payload["closed_at"],
            payload["delivery_id"],
        )


def summarize(evaluation: Evaluation, report: DeliveryReport) -> str:
    """One line for a sensor tick: what was sent, what is pending and why."""

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    text = (
        f"{n(report.alerts_sent, 'alert')} sent, {n(report.recoveries_sent, 'recovery notice')} sent,"
        f" {report.pending} pending; {n(evaluation.opened, 'episode')} opened, {evaluation.closed} closed"
    )
    if report.busy:
        text += "; another delivery pass was running, this one sent nothing"
    if report.problems:
        text += "; waiting: " + "; ".join(report.problems)
    return text
