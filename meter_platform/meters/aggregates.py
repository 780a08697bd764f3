"""Meter definitions as the database holds them, and the SQL that aggregates a meter.

``meters.yaml`` says what the meters should be; the ``meter_definitions`` table says what the
aggregates were computed with. The ingestion pipeline aggregates with the *active* definitions (read
share-locked in its own transaction); a replay (``meter_platform.meters.rebuild``) is the one place where a
definition becomes active.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from meter_platform.catalog import Catalog, Meter
from meter_platform.meters.rollups import upsert_all_levels_sql

Bind = Callable[[str], str]


def psycopg_bind(name: str) -> str:
    """Placeholder style of psycopg (``%(name)s``)."""
    return f"%({name})s"


def sqlalchemy_bind(name: str) -> str:
    """Placeholder style of SQLAlchemy ``text()`` (``:name``)."""
    return f":{name}"


def _path(dotted: str) -> list[str]:
    return dotted.split(".")


def _filter_text(value: Any) -> str:
    """A filter value as ``properties #>> path`` renders it (JSON scalars as text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def event_expressions(meter: Meter, params: dict[str, Any], bind: Bind) -> tuple[str, str, str]:
    """SQL over a ``usage_events``-shaped row for the meter: (dims object, value, filter condition).

    The value is numeric for numeric aggregations (NULL when the property is absent or not a number)
    and text for ``unique_count``; ``params`` receives the bind values.
    """
    dims = []
    for i, dim in enumerate(meter.group_by):
        params[f"dk{i}"], params[f"dp{i}"] = dim, _path(dim)
        dims.append(f"CAST({bind(f'dk{i}')} AS text), properties #>> {bind(f'dp{i}')}")
    dims_sql = f"jsonb_build_object({', '.join(dims)})" if dims else "'{}'::jsonb"
    if not meter.value_property:
        value_sql = "CAST(NULL AS numeric)"
    else:
        params["vp"] = _path(meter.value_property)
        if meter.aggregation == "unique_count":
            value_sql = f"properties #>> {bind('vp')}"
        else:
            value_sql = (
                f"CASE WHEN jsonb_typeof(properties #> {bind('vp')}) = 'number'"
                f" THEN CAST(properties #>> {bind('vp')} AS numeric) END"
            )
    params["event_type"] = meter.event_type
    where = [f"event_type = {bind('event_type')}"]
    for i, (key, values) in enumerate(sorted(meter.filter.items())):
        params[f"fp{i}"], params[f"fv{i}"] = _path(key), [_filter_text(v) for v in values]
        where.append(f"properties #>> {bind(f'fp{i}')} = ANY(CAST({bind(f'fv{i}')} AS text[]))")
    return dims_sql, value_sql, " AND ".join(where)


def minute_aggregates_sql(meter: Meter, source: str, params: dict[str, Any], extra_where: str = "") -> str:
    """A SELECT of the meter's per-minute aggregates computed from ``source`` (psycopg binds into
    ``params``): columns minute, customer_id, dims, event_count, value_count, value_sum, value_min,
    value_max. Ingestion and replays store it; the reconciliation check compares against it.

    ``source`` is a table shaped like ``usage_events`` (a batch's newly stored rows, or the raw events).
    """
    dims_sql, value_sql, where = event_expressions(meter, params, psycopg_bind)
    numeric = "CAST(NULL AS numeric)" if meter.aggregation == "unique_count" else "v"
    return f"""
        SELECT date_trunc('minute', ts) AS minute, customer_id, dims, count(*) AS event_count,
               count({numeric}) AS value_count, sum({numeric}) AS value_sum,
               min({numeric}) AS value_min, max({numeric}) AS value_max
        FROM (SELECT ts, customer_id, {dims_sql} AS dims, {value_sql} AS v
              FROM {source} WHERE {where} {extra_where}) e
        GROUP BY 1, 2, 3"""


def aggregate_upsert_sql(meter: Meter, source: str, extra_where: str = "") -> tuple[str, dict[str, Any]]:
    """The upsert that adds the meter's events found in ``source`` to its per-minute aggregates and
    to their hourly and daily rollups (one statement, see ``meter_platform.meters.rollups``).

    Sums, counts, minima and maxima compose across batches.
    """
    params: dict[str, Any] = {"slug": meter.slug}
    select = minute_aggregates_sql(meter, source, params, extra_where)
    return upsert_all_levels_sql(select, "%(slug)s"), params


def definition(meter: Meter) -> dict[str, Any]:
    """The meter's definition as stored (everything that changes what its aggregates hold)."""
    return {
        "slug": meter.slug,
        "event_type": meter.event_type,
        "aggregation": meter.aggregation,
        "value_property": meter.value_property,
        "group_by": list(meter.group_by),
        "filter": {k: list(v) for k, v in sorted(meter.filter.items())},
    }


def definition_hash(meter: Meter) -> str:
    """A short stable hash of the definition."""
    return hashlib.sha256(json.dumps(definition(meter), sort_keys=True).encode()).hexdigest()[:16]


def meter_from_definition(d: dict[str, Any]) -> Meter:
    """Rebuild a Meter from its stored definition."""
    return Meter(
        slug=d["slug"],
        event_type=d["event_type"],
        aggregation=d["aggregation"],
        value_property=d.get("value_property"),
        group_by=tuple(d.get("group_by") or ()),
        filter={k: tuple(v) for k, v in (d.get("filter") or {}).items()},
    )


def active_meters(conn: psycopg.Connection, *, lock: bool = False) -> list[Meter]:
    """The active definitions; with ``lock``, share-locked until the transaction ends (see module doc)."""
    sql = "SELECT definition FROM meter_definitions ORDER BY slug"
    return [
        meter_from_definition(r[0]) for r in conn.execute(sql + (" FOR SHARE" if lock else "")).fetchall()
    ]


@dataclass(frozen=True)
class MeterChange:
    """A meter whose active definition differs from the catalog's (new, changed or removed), or one
    whose aggregates an operator asked to rebuild as they are."""

    slug: str
    old: Meter | None
    new: Meter | None

    @property
    def kind(self) -> str:
        """``added``, ``changed``, ``removed`` or ``rebuilt`` (same definition, aggregates recomputed)."""
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "rebuilt" if definition_hash(self.old) == definition_hash(self.new) else "changed"


def requested_changes(
    catalog: Catalog, conn: psycopg.Connection, slugs: list[str] | None = None, rebuild: bool = False
) -> list[MeterChange]:
    """The pending changes (all, or those of ``slugs``); with ``rebuild``, also the named meters whose
    definition did not change, so their aggregates are recomputed from raw events (e.g. after the
    reconciliation check found a damaged window). Unknown slugs raise ValueError."""
    changes = {c.slug: c for c in pending_changes(catalog, conn)}
    if not slugs:
        return list(changes.values())
    active = {m.slug: m for m in active_meters(conn)}
    wanted = {m.slug: m for m in catalog.meters}
    unknown = [s for s in slugs if s not in active and s not in wanted]
    if unknown:
        raise ValueError(
            f"no meter {', '.join(map(repr, unknown))} in the catalog or among the active meters"
        )
    out = []
    for slug in slugs:
        if slug in changes:
            out.append(changes[slug])
        elif rebuild:
            out.append(MeterChange(slug, active.get(slug), wanted.get(slug)))
    return out


def pending_changes(catalog: Catalog, conn: psycopg.Connection) -> list[MeterChange]:
    """Meters of the catalog that are not active as defined, and active meters the catalog dropped."""
    active = {m.slug: m for m in active_meters(conn)}
    wanted = {m.slug: m for m in catalog.meters}
    changes = []
    for slug in sorted(active.keys() | wanted.keys()):
        old, new = active.get(slug), wanted.get(slug)
        if old is None or new is None or definition_hash(old) != definition_hash(new):
            changes.append(MeterChange(slug, old, new))
    return changes
