"""The user's catalog: the YAML files in ``METER_CATALOG_DIR`` — event types and meters (``loader``),
alert channels (``alerts``) — each checked at load with every mistake listed at once."""

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

__all__ = [
    "AGGREGATIONS",
    "NUMERIC_AGGREGATIONS",
    "PROPERTY_TYPES",
    "Catalog",
    "CatalogError",
    "EventTypeSpec",
    "Meter",
    "PropertySpec",
    "load_catalog",
]
