"""The peers' ingest APIs (OpenMeter, Lago, Stripe), each under its own prefix, so their official
SDKs work unchanged once pointed at the gateway. Events take the same path as ``POST /v1/events``
(see :mod:`ingest_gateway.peers.common`)."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from ingest_gateway.peers import lago, openmeter, stripe

ROUTES: list[Route] = [*openmeter.ROUTES, *lago.ROUTES, *stripe.ROUTES]


def openapi_paths() -> dict[str, dict[str, Any]]:
    """The peers' entries of /openapi.json."""
    return {**openmeter.OPENAPI_PATHS, **lago.OPENAPI_PATHS, **stripe.OPENAPI_PATHS}
