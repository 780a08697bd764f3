"""The Lago ingest API, under ``/lago``: filled in by the ecosystem work."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

#: This API's routes, mounted by ingest_gateway.app.
ROUTES: list[Route] = []
#: This API's entries of /openapi.json: {path: {method: operation}}.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {}
