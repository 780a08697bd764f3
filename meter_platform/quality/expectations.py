"""The checks great-expectations runs against PostgreSQL (imported only inside them: its import costs
seconds, and nothing on the ingestion path may pay for it)."""

from __future__ import annotations

from typing import Any

import psycopg
import yaml

from meter_platform.catalog import Catalog
from meter_platform.config import QualitySettings
from meter_platform.quality import registry
from meter_platform.quality.outcomes import CheckOutcome
from meter_platform.storage.db import libpq_url, sqlalchemy_url


def expectation_checks(database_url: str, catalog: Catalog, settings: QualitySettings) -> list[CheckOutcome]:
    """The checks great-expectations runs against PostgreSQL.

    - ``no_negative_quantities``: event and value counts of every meter, and sums of meters whose value
      property is declared ``min >= 0``, are never negative;
    - ``values_within_declared_ranges``: stored events' numeric properties respect events.yaml's min/max;
    - ``every_customer_known``: every customer with usage is listed in ``customers.yaml`` (when the
      catalog has one; without it, every customer is accepted and the check says so).

    great-expectations costs seconds to import, so it is imported here, never on the ingestion path.
    """
    validator = _Expectations(database_url, settings)
    return [
        _no_negative_quantities(validator, catalog),
        _values_within_declared_ranges(validator, catalog),
        _every_customer_known(validator, database_url, catalog),
    ]


class _Expectations:
    """The shared great-expectations setup: an ephemeral context with the database as a data source,
    and one query asset per validation."""

    def __init__(self, database_url: str, settings: QualitySettings) -> None:
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in run logs
        self.source = context.data_sources.add_postgres(
            "meter", connection_string=sqlalchemy_url(database_url, driver="psycopg2")
        )
        #: ``great_expectations.expectations``, the expectation classes.
        self.gxe: Any = gxe
        #: SQL for the start of the lookback window.
        self.since = f"now() - interval '{int(settings.lookback.total_seconds())} seconds'"
        self._counter = iter(range(1_000_000))

    def unexpected(self, query: str, expectation: Any) -> tuple[int, list[Any]]:
        """Validate ``query``'s rows: (how many rows are unexpected, a partial list of them)."""
        asset = self.source.add_query_asset(f"q{next(self._counter)}", query=query)
        batch = asset.add_batch_definition_whole_table("all").get_batch()
        result = batch.validate(expectation)
        return int(result.result.get("unexpected_count") or 0), list(
            result.result.get("partial_unexpected_list") or []
        )


def _non_negative_sum_meters(catalog: Catalog) -> list[str]:
    """The sum meters whose value property is declared ``min >= 0``."""
    slugs = []
    for meter in catalog.meters:
        spec = catalog.event_types.get(meter.event_type)
        prop = next((p for p in spec.properties if p.name == meter.value_property), None) if spec else None
        if meter.aggregation == "sum" and prop is not None and prop.min is not None and prop.min >= 0:
            slugs.append(meter.slug)
    return slugs


def _no_negative_quantities(validator: _Expectations, catalog: Catalog) -> CheckOutcome:
    """1. No negative quantities."""
    non_negative_sums = _non_negative_sum_meters(catalog)
    found: dict[str, Any] = {}
    for column, slugs in (("event_count", None), ("value_count", None), ("value_sum", non_negative_sums)):
        where = f"minute >= {validator.since}" + (
            f" AND meter_slug IN ({', '.join(repr(s) for s in slugs)})" if slugs else ""
        )
        if slugs == []:
            continue
        count, sample = validator.unexpected(
            f"SELECT {column} FROM usage_minute_aggregates WHERE {where}",
            validator.gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0),
        )
        if count:
            found[column] = {"rows": count, "sample": [str(v) for v in sample[:5]]}
    return registry.outcome(
        "no_negative_quantities",
        not found,
        "negative quantities in " + ", ".join(f"{k} ({v['rows']} rows)" for k, v in found.items())
        if found
        else "no negative counts or sums in the aggregates",
        {"negative": found, "non_negative_sum_meters": non_negative_sums},
    )


def _values_within_declared_ranges(validator: _Expectations, catalog: Catalog) -> CheckOutcome:
    """2. Values within the ranges events.yaml declares."""
    out_of_range: dict[str, Any] = {}
    checked = 0
    for spec in catalog.event_types.values():
        for prop in spec.properties:
            if prop.type not in ("integer", "number") or (prop.min is None and prop.max is None):
                continue
            checked += 1
            path = "{" + ",".join(prop.name.split(".")) + "}"
            count, sample = validator.unexpected(
                f"SELECT CAST(properties #>> '{path}' AS numeric) AS v FROM usage_events"
                f" WHERE event_type = '{spec.name}' AND jsonb_typeof(properties #> '{path}') = 'number'"
                f" AND received_at >= {validator.since}",
                validator.gxe.ExpectColumnValuesToBeBetween(
                    column="v", min_value=prop.min, max_value=prop.max
                ),
            )
            if count:
                out_of_range[f"{spec.name}.{prop.name}"] = {
                    "rows": count,
                    "sample": [str(v) for v in sample[:5]],
                }
    return registry.outcome(
        "values_within_declared_ranges",
        not out_of_range,
        "stored values outside their declared range: " + ", ".join(out_of_range)
        if out_of_range
        else f"{checked} declared numeric ranges hold for the stored events",
        {"properties_checked": checked, "out_of_range": out_of_range},
    )


def _every_customer_known(validator: _Expectations, database_url: str, catalog: Catalog) -> CheckOutcome:
    """3. Every customer known."""
    known = known_customers(database_url, catalog)
    if known is None:
        return registry.outcome(
            "every_customer_known",
            True,
            "no customer registered (PUT /v1/customers) and no customers.yaml: every customer id is accepted",
            {"registry": False},
        )
    count, sample = validator.unexpected(
        f"SELECT DISTINCT customer_id FROM usage_minute_aggregates WHERE minute >= {validator.since}",
        validator.gxe.ExpectColumnValuesToBeInSet(column="customer_id", value_set=sorted(known)),
    )
    return registry.outcome(
        "every_customer_known",
        count == 0,
        f"{count} customer(s) with usage are not registered (PUT /v1/customers or customers.yaml), e.g. {', '.join(map(str, sample[:5]))}"
        if count
        else f"every customer with usage is one of the {len(known)} registered",
        {"registry": True, "unknown_customers": count, "sample": [str(v) for v in sample[:20]]},
    )


def known_customers(database_url: str, catalog: Catalog) -> set[str] | None:
    """The customer registry (``customers`` table) with the ids of a ``customers.yaml`` seed; None when
    both are empty (then every customer id is accepted)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        registered = {row[0] for row in conn.execute("SELECT id FROM customers")}
    seed = catalog_customers(catalog) or set()
    return (registered | seed) or None


def catalog_customers(catalog: Catalog) -> set[str] | None:
    """The customer ids of ``customers.yaml`` in the catalog folder, or None when there is none."""
    if catalog.directory is None:
        return None
    path = catalog.directory / "customers.yaml"
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return {str(c["id"] if isinstance(c, dict) else c) for c in data.get("customers") or []}
