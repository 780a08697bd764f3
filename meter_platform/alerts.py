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

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from meter_platform.quality import CheckOutcome

logger = logging.getLogger(__name__)

CHANNEL_TYPES = ("webhook", "log")
#: Severities from the least to the most severe.
SEVERITIES = ("WARN", "ERROR")
ALERTS_FILE = "alerts.yaml"

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

_WEBHOOK_KEYS = {"name", "type", "url", "url_env", "secret_env", "min_severity"}
_LOG_KEYS = {"name", "type", "min_severity"}


class AlertConfigError(ValueError):
    """``alerts.yaml`` cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class AlertChannel:
    """Where notices go: a webhook (``url`` and HMAC ``secret``) or the log."""

    name: str
    type: str
    min_severity: str = "WARN"
    url: str | None = None
    secret: str | None = field(default=None, repr=False)

    def accepts(self, severity: str) -> bool:
        """True when a failure of this severity is alerted on this channel."""
        return SEVERITIES.index(severity) >= SEVERITIES.index(self.min_severity)


#: The channels when the catalog folder has no alerts.yaml.
DEFAULT_CHANNELS = (AlertChannel(name="log", type="log"),)


def alerts_path(catalog_dir: str | Path) -> Path:
    """Where ``alerts.yaml`` is: next to ``meters.yaml`` and ``events.yaml`` in the catalog folder."""
    return Path(catalog_dir) / ALERTS_FILE


def load_channels(path: Path, environ: Mapping[str, str] | None = None) -> list[AlertChannel]:
    """Read and check ``alerts.yaml`` (see the example catalog's for the format).

    A missing file means the log channel only. Secrets and URLs named by ``secret_env``/``url_env`` are
    read from ``environ`` (default: the process environment). Raises :class:`AlertConfigError` listing
    every problem.
    """
    env = os.environ if environ is None else environ
    if not path.exists():
        return list(DEFAULT_CHANNELS)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AlertConfigError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("channels", []), list):
        raise AlertConfigError(f"{path}: expected a mapping with a list under `channels:`")
    unknown_top = set(doc) - {"channels"}
    problems: list[str] = [f"unknown top-level key(s) {sorted(unknown_top)}"] if unknown_top else []
    channels: list[AlertChannel] = []
    seen: set[str] = set()
    for index, item in enumerate(doc.get("channels") or []):
        where = f"channels[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with `name` and `type`")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: `name` is required (a non-empty string)")
            continue
        where = f"{where} ({name})"
        if name in seen:
            problems.append(f"{where}: another channel has this name; names must be unique")
        seen.add(name)
        channel, errors = _channel(name, item, env)
        problems.extend(f"{where}: {error}" for error in errors)
        if channel is not None and not errors:
            channels.append(channel)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise AlertConfigError(f"{path}: {len(problems)} problem(s):\n{listed}")
    return channels


def _channel(
    name: str, item: dict[str, Any], env: Mapping[str, str]
) -> tuple[AlertChannel | None, list[str]]:
    errors: list[str] = []
    kind = item.get("type")
    if kind not in CHANNEL_TYPES:
        return None, [f"unknown type {kind!r}; use one of {', '.join(CHANNEL_TYPES)}"]
    if "secret" in item:
        errors.append(
            "a secret must not be written in the file; put it in an environment variable and name "
            "that variable in `secret_env`"
        )
    allowed = _WEBHOOK_KEYS if kind == "webhook" else _LOG_KEYS
    unknown = set(item) - allowed - {"secret"}
    if unknown:
        errors.append(f"unknown key(s) {sorted(unknown)} for a {kind} channel; allowed: {sorted(allowed)}")
    min_severity = str(item.get("min_severity", "WARN")).upper()
    if min_severity not in SEVERITIES:
        errors.append(f"min_severity {item.get('min_severity')!r} is not one of {', '.join(SEVERITIES)}")
    if kind == "log":
        return AlertChannel(name=name, type=kind, min_severity=min_severity), errors

    url: str | None = None
    if ("url" in item) == ("url_env" in item):
        errors.append("a webhook needs exactly one of `url` or `url_env` (a variable holding the URL)")
    elif "url" in item:
        url = item["url"] if isinstance(item["url"], str) else None
    else:
        url = env.get(str(item["url_env"])) or None
        if url is None:
            errors.append(f"environment variable {item['url_env']} (url_env) is not set")
    if url is not None and not url.startswith(("http://", "https://")):
        errors.append(f"url {url!r} must start with http:// or https://")
    secret: str | None = None
    if "secret_env" not in item:
        errors.append("a webhook needs `secret_env`: the environment variable holding its HMAC-SHA256 key")
    else:
        secret = env.get(str(item["secret_env"])) or None
        if secret is None:
            errors.append(f"environment variable {item['secret_env']} (secret_env) is not set")
    channel = AlertChannel(name=name, type=kind, min_severity=min_severity, url=url, secret=secret)
    return channel, errors


# -- signatures ------------------------------------------------------------------------------------


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


# -- episodes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """What one :func:`evaluate` changed."""

    opened: int = 0
    closed: int = 0
    enqueued: int = 0


def evaluate(
    conn: psycopg.Connection, outcomes: Iterable[CheckOutcome], channels: Sequence[AlertChannel]
) -> Evaluation:
    """Open and close episodes from the latest outcome of each check, writing their notices to the outbox.

    - failing, no open episode: open one; an ``alert`` for each channel whose ``min_severity`` it meets;
    - failing, episode open: nothing new (its severity and description are updated; a channel that
      newly qualifies — the failure escalated to ERROR, or the channel was added — gets its one alert);
    - passing, episode open: close it; a ``recovery`` for each channel that was alerted;
    - passing, nothing open: nothing.

    Each episode change and its notices are one transaction (a savepoint if the caller has one open;
    the caller then commits).
    """
    opened = closed = enqueued = 0
    for outcome in outcomes:
        with conn.transaction():
            episode = conn.execute(
                "SELECT episode_id, severity FROM alert_episodes"
                " WHERE asset = %s AND check_name = %s AND closed_at IS NULL FOR UPDATE",
                (outcome.asset, outcome.check_name),
            ).fetchone()
            if not outcome.passed:
                if episode is None:
                    episode = conn.execute(
                        "INSERT INTO alert_episodes (asset, check_name, severity, last_description, last_metadata)"
                        " VALUES (%s, %s, %s, %s, %s::jsonb)"
                        " ON CONFLICT (asset, check_name) WHERE closed_at IS NULL DO NOTHING"
                        " RETURNING episode_id, severity",
                        (
                            outcome.asset,
                            outcome.check_name,
                            outcome.severity,
                            outcome.description,
                            _json(outcome.metadata),
                        ),
                    ).fetchone()
                    if episode is None:  # another evaluation opened it a moment ago, with its alerts
                        continue
                    opened += 1
                else:
                    worst = max(episode[1], outcome.severity, key=SEVERITIES.index)
                    conn.execute(
                        "UPDATE alert_episodes SET severity = %(sev)s, last_description = %(desc)s,"
                        " last_metadata = %(meta)s::jsonb WHERE episode_id = %(id)s"
                        " AND (severity, last_description, last_metadata)"
                        " IS DISTINCT FROM (%(sev)s, %(desc)s, %(meta)s::jsonb)",
                        {
                            "sev": worst,
                            "desc": outcome.description,
                            "meta": _json(outcome.metadata),
                            "id": episode[0],
                        },
                    )
                    episode = (episode[0], worst)
                targets = [c for c in channels if c.accepts(episode[1])]
                enqueued += _enqueue(conn, episode[0], "alert", targets, outcome)
            elif episode is not None:
                conn.execute(
                    "UPDATE alert_episodes SET closed_at = now() WHERE episode_id = %s", (episode[0],)
                )
                alerted = {
                    row[0]
                    for row in conn.execute(
                        "SELECT channel FROM alert_deliveries WHERE episode_id = %s AND kind = 'alert'",
                        (episode[0],),
                    )
                }
                targets = [c for c in channels if c.name in alerted]
                enqueued += _enqueue(conn, episode[0], "recovery", targets, outcome)
                closed += 1
    return Evaluation(opened=opened, closed=closed, enqueued=enqueued)


def _enqueue(
    conn: psycopg.Connection,
    episode_id: int,
    kind: str,
    channels: Sequence[AlertChannel],
    outcome: CheckOutcome,
) -> int:
    notified = {
        r[0]
        for r in conn.execute(
            "SELECT channel FROM alert_deliveries WHERE episode_id = %s AND kind = %s", (episode_id, kind)
        )
    }
    channels = [c for c in channels if c.name not in notified]
    if not channels:
        return 0
    row = conn.execute(
        "SELECT asset, check_name, severity, opened_at, closed_at, last_description"
        " FROM alert_episodes WHERE episode_id = %s",
        (episode_id,),
    ).fetchone()
    assert row is not None
    asset, check_name, severity, opened_at, closed_at, last_description = row
    count = 0
    for channel in channels:
        delivery_id = str(uuid.uuid4())
        payload = {
            "event": kind,
            "check": check_name,
            "asset": asset,
            "severity": severity,
            "passed": outcome.passed,
            "description": outcome.description,
            "metadata": outcome.metadata,
            "opened_at": opened_at.isoformat(),
            "closed_at": closed_at.isoformat() if closed_at else None,
            "episode_id": episode_id,
            "delivery_id": delivery_id,
        }
        if kind == "recovery":
            payload["failure_description"] = last_description
        cur = conn.execute(
            "INSERT INTO alert_deliveries (delivery_id, episode_id, kind, channel, payload)"
            " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (episode_id, kind, channel) DO NOTHING",
            (delivery_id, episode_id, kind, channel.name, _json(payload)),
        )
        count += cur.rowcount
    return count


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


# -- delivery --------------------------------------------------------------------------------------


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
                conn.execute(
                    "UPDATE alert_deliveries SET delivered_at = now(), attempts = attempts + %s,"
                    " last_error = NULL WHERE delivery_id = %s",
                    (tries, delivery_id),
                )
                sent[kind] += 1
                continue
            total = attempts + tries
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
