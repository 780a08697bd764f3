"""The customer registry and subscriptions to plans (PostgreSQL; no Dagster).

A customer's subscriptions never overlap: changing plan at an instant ends the running subscription
there and starts the new one at the same instant, so usage before it is billed on the old plan and
usage from it on the new one. Writes take a lock on the customer row, so two changes at once are
applied one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg

from meter_platform.billing.invoice import rfc3339
from meter_platform.billing.periods import Subscription, period_key
from meter_platform.capture.envelope import parse_timestamp
from meter_platform.catalog.plans import Plan
from meter_platform.errors import Conflict, InvalidRequest, NotFound

_FIELDS = ("name", "email", "plan", "subscribed_from")


def _plan(plans: Mapping[str, Plan], key: Any) -> Plan:
    if not isinstance(key, str) or key not in plans:
        known = ", ".join(sorted(plans)) or "none: add plans.yaml to the catalog"
        raise InvalidRequest(
            f"unknown plan {key!r}; plans: {known}", [{"field": "plan", "message": "unknown"}]
        )
    return plans[key]


def _check_not_final(conn: psycopg.Connection, customer_id: str, at: datetime) -> None:
    """A change at ``at`` would restate billed usage if that period (or a later one) is final."""
    row = conn.execute(
        "SELECT max(period) FROM invoices WHERE customer_id = %s AND status = 'final'", (customer_id,)
    ).fetchone()
    if row and row[0] and row[0] >= period_key(at):
        raise Conflict(
            f"the invoice of {customer_id} for {row[0]} is final; a plan change must start after that period"
        )


def subscribe(
    conn: psycopg.Connection, customer_id: str, plan_key: str, at: datetime, plans: Mapping[str, Plan]
) -> bool:
    """Put ``customer_id`` on ``plan_key`` from ``at`` (the caller commits). False when already on it.

    Ends the running subscription at ``at``; ``at`` must be after its start, in a period not yet final,
    and the new plan must bill in the same currency as the running one.
    """
    plan = _plan(plans, plan_key)
    if conn.execute("SELECT 1 FROM customers WHERE id = %s FOR UPDATE", (customer_id,)).fetchone() is None:
        raise NotFound(f"no customer {customer_id!r}: create it with PUT /v1/customers/{{id}} first")
    running = conn.execute(
        "SELECT subscription_id, plan, starts_at FROM subscriptions WHERE customer_id = %s AND ends_at IS NULL",
        (customer_id,),
    ).fetchone()
    later = conn.execute(
        "SELECT starts_at FROM subscriptions WHERE customer_id = %s AND (ends_at > %s OR starts_at >= %s)"
        " AND ends_at IS NOT NULL",
        (customer_id, at, at),
    ).fetchone()
    if later is not None:
        raise InvalidRequest(
            f"{customer_id} has a subscription after {rfc3339(at)}; changes must move forward"
        )
    if running is not None:
        sub_id, current, starts_at = running
        if current == plan_key:
            return False
        if at <= starts_at:
            raise InvalidRequest(
                f"the change must start after the running subscription's start ({rfc3339(starts_at)})",
                [{"field": "starts_at", "message": "before the running subscription's start"}],
            )
        if current in plans and plans[current].currency != plan.currency:
            raise InvalidRequest(
                f"plan {plan_key!r} bills in {plan.currency}, the running plan {current!r} in "
                f"{plans[current].currency}; a customer's plans must share a currency"
            )
        _check_not_final(conn, customer_id, at)
        conn.execute("UPDATE subscriptions SET ends_at = %s WHERE subscription_id = %s", (at, sub_id))
    else:
        _check_not_final(conn, customer_id, at)
    conn.execute(
        "INSERT INTO subscriptions (customer_id, plan, starts_at) VALUES (%s, %s, %s)",
        (customer_id, plan_key, at),
    )
    return True


def put_customer(
    conn: psycopg.Connection,
    customer_id: str,
    body: Mapping[str, Any],
    plans: Mapping[str, Plan],
    now: datetime | None = None,
) -> bool:
    """Create or update a customer from a ``PUT /v1/customers/{id}`` body; True when it was created.

    ``name`` and ``email`` are replaced when given; ``plan`` (with ``subscribed_from``, default now)
    subscribes it, or changes its plan at that instant. The caller commits.
    """
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; a customer has {', '.join(_FIELDS)}",
            [{"field": f, "message": "unknown field"} for f in unknown],
        )
    for name in ("name", "email"):
        if body.get(name) is not None and (not isinstance(body[name], str) or len(body[name]) > 1000):
            raise InvalidRequest(
                f"{name} must be a string of at most 1000 characters", [{"field": name, "message": "invalid"}]
            )
    at = (
        parse_instant(body.get("subscribed_from"), "subscribed_from") if body.get("subscribed_from") else None
    )
    row = conn.execute(
        "INSERT INTO customers (id, name, email) VALUES (%s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET name = coalesce(EXCLUDED.name, customers.name),"
        " email = coalesce(EXCLUDED.email, customers.email), updated_at = now()"
        " RETURNING (xmax = 0)",
        (customer_id, body.get("name"), body.get("email")),
    ).fetchone()
    if body.get("plan") is not None:
        subscribe(conn, customer_id, body["plan"], at or now or datetime.now(UTC), plans)
    return bool(row and row[0])


def parse_instant(value: Any, name: str) -> datetime:
    """An RFC 3339 instant from a request body, or InvalidRequest naming the field."""
    try:
        if not isinstance(value, str):
            raise ValueError("must be an RFC 3339 string with an offset")
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} {exc}", [{"field": name, "message": str(exc)}]) from exc


def customer_json(conn: psycopg.Connection, customer_id: str) -> dict[str, Any] | None:
    """``GET /v1/customers/{id}``: the customer with its subscriptions, oldest first; None if unknown."""
    row = conn.execute("SELECT id, name, email FROM customers WHERE id = %s", (customer_id,)).fetchone()
    if row is None:
        return None
    subs = conn.execute(
        "SELECT plan, starts_at, ends_at FROM subscriptions WHERE customer_id = %s ORDER BY starts_at",
        (customer_id,),
    ).fetchall()
    return {
        "id": row[0],
        "name": row[1],
        "email": row[2],
        "subscriptions": [
            {"plan": p, "starts_at": rfc3339(s), "ends_at": rfc3339(e) if e else None} for p, s, e in subs
        ],
    }


def list_customers(conn: psycopg.Connection, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    """Customers by id, each with its subscriptions."""
    ids = [
        r[0] for r in conn.execute("SELECT id FROM customers ORDER BY id LIMIT %s OFFSET %s", (limit, offset))
    ]
    return [c for c in (customer_json(conn, i) for i in ids) if c is not None]


def subscriptions_in(
    conn: psycopg.Connection, start: datetime, end: datetime
) -> dict[str, list[Subscription]]:
    """Every customer's subscriptions that overlap ``[start, end)``, by customer id, oldest first."""
    out: dict[str, list[Subscription]] = {}
    for customer, plan, starts_at, ends_at in conn.execute(
        "SELECT customer_id, plan, starts_at, ends_at FROM subscriptions"
        " WHERE starts_at < %s AND (ends_at IS NULL OR ends_at > %s) ORDER BY customer_id, starts_at",
        (end, start),
    ):
        out.setdefault(customer, []).append(Subscription(plan, starts_at, ends_at))
    return out


def seed_from_file(conn: psycopg.Connection, customer_ids: set[str]) -> int:
    """Register the ids of a ``customers.yaml`` seed that are not known yet; returns how many."""
    if not customer_ids:
        return 0
    cur = conn.execute(
        "INSERT INTO customers (id) SELECT unnest(%s::text[]) ON CONFLICT (id) DO NOTHING",
        (sorted(customer_ids),),
    )
    return cur.rowcount
