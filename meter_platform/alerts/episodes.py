"""Alert episodes: a failing check opens one, alerts each channel once, and closes with one recovery.

See :mod:`meter_platform.alerts` for the guarantees; this module writes the ``alert_deliveries`` outbox,
:mod:`meter_platform.alerts.delivery` sends it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from meter_platform.catalog.alerts import SEVERITIES, AlertChannel
from meter_platform.quality import CheckOutcome


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
                    episode = _open_episode(conn, outcome)
                    if episode is None:  # another evaluation opened it a moment ago, with its alerts
                        continue
                    opened += 1
                else:
                    episode = _update_episode(conn, episode, outcome)
                targets = [c for c in channels if c.accepts(episode[1])]
                enqueued += _enqueue(conn, episode[0], "alert", targets, outcome)
            elif episode is not None:
                enqueued += _close_episode(conn, episode[0], outcome, channels)
                closed += 1
    return Evaluation(opened=opened, closed=closed, enqueued=enqueued)


def _open_episode(conn: psycopg.Connection, outcome: CheckOutcome) -> tuple[Any, ...] | None:
    """A new open episode's ``(episode_id, severity)``; None if another evaluation opened one first."""
    return conn.execute(
        "INSERT INTO alert_episodes (asset, check_name, severity, last_description, last_metadata)"
        " VALUES (%s, %s, %s, %s, %s::jsonb)"
        " ON CONFLICT (asset, check_name) WHERE closed_at IS NULL DO NOTHING"
        " RETURNING episode_id, severity",
        (
            outcome.asset,
            outcome.check_name,
            outcome.severity,
            outcome.description,
            json_text(outcome.metadata),
        ),
    ).fetchone()


def _update_episode(
    conn: psycopg.Connection, episode: tuple[Any, ...], outcome: CheckOutcome
) -> tuple[Any, ...]:
    """An open episode failing again: its worst severity and latest description; ``(id, worst)``."""
    worst = max(episode[1], outcome.severity, key=SEVERITIES.index)
    conn.execute(
        "UPDATE alert_episodes SET severity = %(sev)s, last_description = %(desc)s,"
        " last_metadata = %(meta)s::jsonb WHERE episode_id = %(id)s"
        " AND (severity, last_description, last_metadata)"
        " IS DISTINCT FROM (%(sev)s, %(desc)s, %(meta)s::jsonb)",
        {
            "sev": worst,
            "desc": outcome.description,
            "meta": json_text(outcome.metadata),
            "id": episode[0],
        },
    )
    return (episode[0], worst)


def _close_episode(
    conn: psycopg.Connection, episode_id: int, outcome: CheckOutcome, channels: Sequence[AlertChannel]
) -> int:
    """Close a passing check's episode; a ``recovery`` for each channel that was alerted (how many)."""
    conn.execute("UPDATE alert_episodes SET closed_at = now() WHERE episode_id = %s", (episode_id,))
    alerted = {
        row[0]
        for row in conn.execute(
            "SELECT channel FROM alert_deliveries WHERE episode_id = %s AND kind = 'alert'",
            (episode_id,),
        )
    }
    targets = [c for c in channels if c.name in alerted]
    return _enqueue(conn, episode_id, "recovery", targets, outcome)


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
            (delivery_id, episode_id, kind, channel.name, json_text(payload)),
        )
        count += cur.rowcount
    return count


def json_text(value: Any) -> str:
    return json.dumps(value, default=str)


# -- delivery --------------------------------------------------------------------------------------
