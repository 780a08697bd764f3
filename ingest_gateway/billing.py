"""Customers, subscriptions and invoices: ``/v1/customers`` and ``/v1/invoices`` (JSON, CSV, HTML).

Low-volume administrative routes: each runs its statements on its own PostgreSQL connection in a
worker thread, in one transaction, with the billing room's functions (the same ones the CLI and the
Dagster assets use).
"""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ingest_gateway.gateway import gateway_of, in_transaction
from ingest_gateway.http import ApiError, json_response, paging, read_json_object
from meter_platform.billing import customers, statements

T = TypeVar("T")


def _customer_id(request: Request) -> str:
    customer_id = request.path_params["customer_id"]
    if not 1 <= len(customer_id) <= 256 or "\x00" in customer_id:
        raise ApiError(400, "A customer id is 1 to 256 characters, without NUL.")
    return customer_id


async def put_customer(request: Request) -> Response:
    """PUT /v1/customers/{id}: create or update; with ``plan``, subscribe (or change plan) at
    ``subscribed_from`` (default: now). 201 when created, 200 when updated."""
    customer_id, body = _customer_id(request), await read_json_object(request)
    plans = gateway_of(request).catalog.plans

    def work(conn: psycopg.Connection) -> tuple[bool, dict[str, Any] | None]:
        created = customers.put_customer(conn, customer_id, body, plans)
        return created, customers.customer_json(conn, customer_id)

    created, customer = await in_transaction(gateway_of(request), work)
    return json_response(customer, status=201 if created else 200)


async def get_customer(request: Request) -> Response:
    """GET /v1/customers/{id}: the customer and its subscriptions."""
    customer_id = _customer_id(request)
    customer = await in_transaction(
        gateway_of(request), lambda conn: customers.customer_json(conn, customer_id)
    )
    if customer is None:
        raise ApiError(404, f"No customer {customer_id!r}; create it with PUT /v1/customers/{{id}}.")
    return json_response(customer)


async def list_customers(request: Request) -> Response:
    """GET /v1/customers: every customer by id, with subscriptions (``limit``, ``offset``)."""
    limit, offset = paging(request, default=1000)
    found = await in_transaction(
        gateway_of(request), lambda conn: customers.list_customers(conn, limit, offset)
    )
    return json_response({"customers": found})


async def post_subscription(request: Request) -> Response:
    """POST /v1/customers/{id}/subscriptions ``{"plan", "starts_at"}``: change plan at that instant."""
    customer_id, body = _customer_id(request), await read_json_object(request)
    unknown = sorted(set(body) - {"plan", "starts_at"})
    if unknown or "plan" not in body:
        raise ApiError(400, "The body is {\"plan\": ..., \"starts_at\": RFC 3339 (default: now)}.",
                       [{"field": f, "message": "unknown field"} for f in unknown])  # fmt: skip
    at = customers.parse_instant(body["starts_at"], "starts_at") if body.get("starts_at") else None
    plans = gateway_of(request).catalog.plans

    def work(conn: psycopg.Connection) -> dict[str, Any] | None:
        from datetime import UTC, datetime

        customers.subscribe(conn, customer_id, body["plan"], at or datetime.now(UTC), plans)
        return customers.customer_json(conn, customer_id)

    return json_response(await in_transaction(gateway_of(request), work), status=201)


def _filters(request: Request) -> tuple[str | None, str | None, str | None]:
    q = request.query_params
    return q.get("customer_id") or None, q.get("period") or None, q.get("status") or None


async def list_invoices(request: Request) -> Response:
    """GET /v1/invoices?customer_id=&period=YYYY-MM&status=draft|final."""
    customer_id, period, status = _filters(request)
    found = await in_transaction(
        gateway_of(request), lambda conn: statements.invoices_json(conn, customer_id, period, status)
    )
    return json_response({"invoices": found})


async def invoices_csv(request: Request) -> Response:
    """GET /v1/invoices.csv?period=: one row per invoice line, for finance."""
    customer_id, period, status = _filters(request)
    found = await in_transaction(
        gateway_of(request),
        lambda conn: statements.invoices_csv(statements.invoices_json(conn, customer_id, period, status)),
    )
    name = statements.safe_filename(f"invoices-{period or 'all'}.csv")
    return Response(found, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip


async def _invoice(request: Request) -> tuple[dict[str, Any], dict[str, Any] | None]:
    invoice_id = request.path_params["invoice_id"]

    def work(conn: psycopg.Connection) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        inv = statements.invoice_json(conn, invoice_id)
        return inv, customers.customer_json(conn, inv["customer_id"]) if inv else None

    inv, customer = await in_transaction(gateway_of(request), work)
    if inv is None:
        raise ApiError(404, f"No invoice {invoice_id!r}; GET /v1/invoices lists them.")
    return inv, customer


async def get_invoice(request: Request) -> Response:
    """GET /v1/invoices/{id}."""
    inv, _ = await _invoice(request)
    return json_response(inv)


async def invoice_html(request: Request) -> Response:
    """GET /v1/invoices/{id}.html: the invoice as a page to send or print."""
    inv, customer = await _invoice(request)
    return HTMLResponse(statements.invoice_html(inv, customer))
