"""The user's catalog: meters (``meters.yaml``), event types (``events.yaml``), plans (``plans.yaml``) and
inbound webhooks (``webhooks.yaml``).

Loaded and checked once at start-up; every mistake is reported with the file, the item and what to do,
so a bad catalog stops the platform before any event is metered against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meter_platform.catalog.plans import Plan, PlanError, load_plans
from meter_platform.catalog.webhooks import WEBHOOKS_FILE, WebhookSource, load_webhooks

AGGREGATIONS = ("count", "sum", "min", "max", "avg", "unique_count", "latest")
#: Aggregations that need a numeric ``value_property``.
NUMERIC_AGGREGATIONS = ("sum", "min", "max", "avg", "latest")
PROPERTY_TYPES = ("string", "integer", "number", "boolean", "timestamp")
_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PATH = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class CatalogError(ValueError):
    """The catalog cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class PropertySpec:
    """One declared property of an event type."""

    name: str
    type: str
    required: bool = False
    enum: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class EventTypeSpec:
    """An event type and its declared properties."""

    name: str
    properties: tuple[PropertySpec, ...] = ()


@dataclass(frozen=True)
class Meter:
    """A meter: which events, how they aggregate, along which dimensions."""

    slug: str
    event_type: str
    aggregation: str
    value_property: str | None = None
    group_by: tuple[str, ...] = ()
    filter: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[str, ...]:
        """Every dimension a usage query may group by: ``customer_id`` and the meter's ``group_by``."""
        return ("customer_id", *self.group_by)

    def as_json(self) -> dict[str, Any]:
        """The meter as ``GET /v1/meters`` shows it."""
        out: dict[str, Any] = {
            "slug": self.slug,
            "event_type": self.event_type,
            "aggregation": self.aggregation,
            "value_property": self.value_property,
            "group_by": list(self.group_by),
        }
        if self.filter:
            out["filter"] = {k: (v[0] if len(v) == 1 else list(v)) for k, v in self.filter.items()}
        return out


@dataclass(frozen=True)
class Catalog:
    """Meters and event types, checked against each other."""

    meters: tuple[Meter, ...]
    event_types: dict[str, EventTypeSpec]
    accept_unknown_event_types: bool = False
    directory: Path | None = None  # where it was loaded from (other files of the catalog live there)
    plans: dict[str, Plan] = field(default_factory=dict)  # plans.yaml, by key (none without the file)
    webhooks: dict[str, WebhookSource] = field(default_factory=dict)  # webhooks.yaml, by source name

    def meter(self, slug: str) -> Meter | None:
        """The meter with that slug, or None."""
        return next((m for m in self.meters if m.slug == slug), None)

    def meters_for(self, event_type: str) -> list[Meter]:
        """The meters that count events of this type."""
        return [m for m in self.meters if m.event_type == event_type]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CatalogError(f"{path} is missing: create it or point METER_CATALOG_DIR at a folder holding it.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"{path} must hold a mapping at the top level.")
    return data


def _parse_property(et: str, name: str, raw: Any, errors: list[str]) -> PropertySpec | None:
    where = f"events.yaml: event type {et!r}, property {name!r}"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping like {{type: string}}.")
        return None
    ptype = raw.get("type")
    if ptype not in PROPERTY_TYPES:
        errors.append(f"{where}: type {ptype!r} is not one of {', '.join(PROPERTY_TYPES)}.")
        return None
    unknown = set(raw) - {"type", "required", "enum", "min", "max", "pattern", "description"}
    if unknown:
        errors.append(f"{where}: unknown keys {sorted(unknown)}.")
    for bound in ("min", "max"):
        if raw.get(bound) is not None and (
            ptype not in ("integer", "number") or not isinstance(raw[bound], int | float)
        ):
            errors.append(f"{where}: {bound} needs a numeric property and a number.")
    enum = raw.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        errors.append(f"{where}: enum must be a non-empty list.")
    pattern = raw.get("pattern")
    if pattern is not None:
        if ptype != "string":
            errors.append(f"{where}: pattern applies to string properties only.")
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            errors.append(f"{where}: pattern {pattern!r} is not a valid regular expression ({exc}).")
    return PropertySpec(
        name=name,
        type=ptype,
        required=bool(raw.get("required", False)),
        enum=tuple(enum) if isinstance(enum, list) else None,
        min=raw.get("min"),
        max=raw.get("max"),
        pattern=pattern,
    )


def _parse_event_types(data: dict[str, Any], errors: list[str]) -> dict[str, EventTypeSpec]:
    raw_types = data.get("event_types") or {}
    if not isinstance(raw_types, dict):
        errors.append("events.yaml: event_types must be a mapping of event type name to its declaration.")
        return {}
    out: dict[str, EventTypeSpec] = {}
    for et, decl in raw_types.items():
        decl = decl or {}
        props_raw = decl.get("properties") or {}
        if not isinstance(props_raw, dict):
            errors.append(f"events.yaml: event type {et!r}: properties must be a mapping.")
            continue
        props = [_parse_property(et, name, raw, errors) for name, raw in props_raw.items()]
        out[str(et)] = EventTypeSpec(name=str(et), properties=tuple(p for p in props if p is not None))
    return out


def _parse_meter(
    i: int, raw: Any, event_types: dict[str, EventTypeSpec], accept_unknown: bool, errors: list[str]
) -> Meter | None:
    if not isinstance(raw, dict):
        errors.append(f"meters.yaml: meter #{i + 1} must be a mapping.")
        return None
    slug = raw.get("slug")
    where = f"meters.yaml: meter {slug!r}" if slug else f"meters.yaml: meter #{i + 1}"
    before = len(errors)
    if not isinstance(slug, str) or not _SLUG.match(slug):
        errors.append(
            f"{where}: slug must be lower-case letters, digits and _ (at most 64), starting with a letter."
        )
    event_type = raw.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        errors.append(f"{where}: event_type is required.")
    elif event_type not in event_types and not accept_unknown:
        errors.append(f"{where}: event_type {event_type!r} is not declared in events.yaml.")
    aggregation = raw.get("aggregation")
    if aggregation not in AGGREGATIONS:
        errors.append(f"{where}: aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}.")
    value_property = raw.get("value_property")
    declared = {p.name: p for p in event_types[event_type].properties} if event_type in event_types else {}
    _check_value_property(where, aggregation, value_property, declared, errors)
    group_by = _parse_meter_group_by(where, raw.get("group_by") or [], errors)
    filt = _parse_meter_filter(where, raw.get("filter") or {}, errors)
    if len(errors) > before:
        return None
    assert isinstance(slug, str) and isinstance(event_type, str) and isinstance(aggregation, str)
    return Meter(
        slug=slug,
        event_type=event_type,
        aggregation=aggregation,
        value_property=value_property,
        group_by=tuple(group_by),
        filter=filt,
    )


def _check_value_property(
    where: str, aggregation: Any, value_property: Any, declared: dict[str, PropertySpec], errors: list[str]
) -> None:
    """Numeric and unique_count aggregations need a property path (numeric if declared); count none."""
    if aggregation in NUMERIC_AGGREGATIONS or aggregation == "unique_count":
        if not value_property:
            errors.append(
                f"{where}: aggregation {aggregation!r} needs a value_property (a dotted path into properties)."
            )
        elif not isinstance(value_property, str) or not _PATH.match(value_property):
            errors.append(f"{where}: value_property {value_property!r} is not a dotted property path.")
        elif (
            aggregation in NUMERIC_AGGREGATIONS
            and value_property in declared
            and declared[value_property].type not in ("integer", "number")
        ):
            errors.append(
                f"{where}: value_property {value_property!r} is declared as "
                f"{declared[value_property].type}; {aggregation} needs an integer or number."
            )
    elif value_property is not None:
        errors.append(f"{where}: a count meter takes no value_property (remove it, or use aggregation: sum).")


def _parse_meter_group_by(where: str, group_by: Any, errors: list[str]) -> list[str]:
    """A meter's ``group_by``: distinct property paths, without ``customer_id`` (always a dimension)."""
    if not isinstance(group_by, list) or not all(isinstance(g, str) for g in group_by):
        errors.append(f"{where}: group_by must be a list of property paths.")
        group_by = []
    for g in group_by:
        if not _PATH.match(g):
            errors.append(f"{where}: group_by entry {g!r} names no property path.")
        elif g == "customer_id":
            errors.append(f"{where}: customer_id is a dimension of every meter; remove it from group_by.")
    if len(set(group_by)) != len(group_by):
        errors.append(f"{where}: group_by names a dimension twice.")
    return group_by


def _parse_meter_filter(where: str, filt_raw: Any, errors: list[str]) -> dict[str, tuple[Any, ...]]:
    """A meter's ``filter``: property path to the scalar values it accepts."""
    filt: dict[str, tuple[Any, ...]] = {}
    if not isinstance(filt_raw, dict):
        errors.append(f"{where}: filter must map property paths to a value or a list of values.")
        return filt
    for key, val in filt_raw.items():
        if not isinstance(key, str) or not _PATH.match(key):
            errors.append(f"{where}: filter key {key!r} is not a property path.")
            continue
        values = tuple(val) if isinstance(val, list) else (val,)
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            errors.append(f"{where}: filter {key!r} must be a scalar or a non-empty list of scalars.")
        filt[key] = values
    return filt


def load_catalog(catalog_dir: Path) -> Catalog:
    """Load ``events.yaml`` and ``meters.yaml`` (and ``plans.yaml``, ``webhooks.yaml`` when present) from
    ``catalog_dir``; raise CatalogError listing every problem."""
    errors: list[str] = []
    events_data = _read_yaml(catalog_dir / "events.yaml")
    meters_data = _read_yaml(catalog_dir / "meters.yaml")
    accept_unknown = bool(events_data.get("accept_unknown_event_types", False))
    event_types = _parse_event_types(events_data, errors)
    raw_meters = meters_data.get("meters") or []
    if not isinstance(raw_meters, list):
        errors.append("meters.yaml: meters must be a list.")
        raw_meters = []
    meters = [_parse_meter(i, raw, event_types, accept_unknown, errors) for i, raw in enumerate(raw_meters)]
    slugs = [m.slug for m in meters if m is not None]
    for slug in {s for s in slugs if slugs.count(s) > 1}:
        errors.append(f"meters.yaml: slug {slug!r} is used by more than one meter.")
    plans: dict[str, Plan] = {}
    try:
        plans = load_plans(catalog_dir / "plans.yaml", {m.slug: m for m in meters if m is not None})
    except PlanError as exc:
        errors.extend(exc.problems or (str(exc),))
    webhooks = load_webhooks(catalog_dir / WEBHOOKS_FILE, None if accept_unknown else event_types, errors)
    if errors:
        raise CatalogError(
            f"The catalog in {catalog_dir} has {len(errors)} problem(s):\n  - " + "\n  - ".join(errors)
        )
    return Catalog(
        meters=tuple(m for m in meters if m is not None),
        event_types=event_types,
        accept_unknown_event_types=accept_unknown,
        directory=catalog_dir,
        plans=plans,
        webhooks=webhooks,
    )
