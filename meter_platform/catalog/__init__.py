"""The user's catalog: the YAML files in ``METER_CATALOG_DIR`` — event types and meters (``loader``),
alert channels (``alerts``), inbound webhooks (``webhooks``) — each checked at load with every mistake listed at once."""

from meter_platform.catalog.loader import (
    AGGREGATIONS,
    NUMERIC_AGGREGATIONS,
    PROPERTY_TYPES,
    Catalog,
    CatalogError,
    EventTypeSpec,
    Meter,
    PropertySpec,
    load_catalog,
)
from meter_platform.catalog.webhooks import WebhookSource

__all__ = [
    "AGGREGATIONS",
    "NUMERIC_AGGREGATIONS",
    "PROPERTY_TYPES",
    "Catalog",
    "CatalogError",
    "EventTypeSpec",
    "Meter",
    "PropertySpec",
    "WebhookSource",
    "load_catalog",
]
