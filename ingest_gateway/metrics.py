"""GET /metrics: the gateway and the pipeline in Prometheus's text format (public, like /healthz).

Two parts, one answer:

* the process's instruments (:mod:`ingest_gateway.metrics_http`: requests by route template,
  events accepted, publish latency and failures) and whatever else is registered in
  prometheus_client's default registry (e.g. the webhooks' rejections). With
  ``PROMETHEUS_MULTIPROC_DIR`` set (``meter up`` sets it when the gateway runs several workers) they
  are the sum over every worker, read from that folder;
* figures read at scrape time (:mod:`ingest_gateway.metrics_scrape` reads them,
  :mod:`ingest_gateway.metrics_pipeline` turns them into metrics): JetStream's backlog and the
  pipeline's ledger, which the Dagster runs write. A scrape answers within about two seconds; a
  dependency that does not answer is left out and ``meter_scrape_dependency_up`` says so.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway.gateway import gateway_of
from ingest_gateway.metrics_pipeline import ScrapeCollector
from ingest_gateway.metrics_scrape import take_snapshot

#: The environment variable that turns on prometheus_client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def process_registry() -> CollectorRegistry:
    """The default registry, or (multiprocess mode) one that adds up every worker's files."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return registry


def exposition(snapshot_registry: CollectorRegistry) -> bytes:
    """The text of both parts (their metric names do not overlap)."""
    return generate_latest(process_registry()) + generate_latest(snapshot_registry)


async def get_metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format 0.0.4."""
    snapshot = await take_snapshot(gateway_of(request))
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(ScrapeCollector(snapshot))
    return Response(exposition(scraped), media_type=CONTENT_TYPE_PLAIN_0_0_4)


ROUTES: list[Route] = [Route("/metrics", get_metrics, methods=["GET"])]

_DESCRIPTION = (
    "The gateway's counters (`meter_http_requests_total{route,method,status}` by route template, "
    "`meter_http_request_duration_seconds`, `meter_events_accepted_total`, `meter_publish_seconds`, "
    "`meter_publish_failures_total`), JetStream's backlog (`meter_jetstream_*`) and the pipeline's "
    "ledger (`meter_pipeline_events_{processed,stored,duplicates,quarantined}_total`, "
    "`meter_pipeline_oldest_waiting_seconds`, ...), read at scrape time within about two seconds: "
    "a dependency that does not answer is left out and `meter_scrape_dependency_up{dependency}` is 0."
)

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics of the gateway and the pipeline.",
            "description": _DESCRIPTION,
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format 0.0.4.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
}
