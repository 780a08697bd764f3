"""Validation of a micro-batch against the catalog: pandera schemas (polars backend) built from
``events.yaml``, applied to a whole batch of one event type at a time.

Property values arrive as loosely typed JSON, so one pass in Python sorts each declared property's
values into a typed column (recording a ``type`` failure for a value of the wrong JSON type); every
constraint after that (required, enum, min, max, pattern, envelope lengths) is checked by pandera on
the columns, and each failure is mapped back to its event with the field and a readable reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import pandera.polars as pa
import polars as pl

from meter_platform.capture.envelope import parse_timestamp, property_at
from meter_platform.capture.messages import Failure
from meter_platform.catalog import Catalog, EventTypeSpec, PropertySpec

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: JSON value types that need no conversion, per property type (anything else goes through _typed).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),  # and within the 64-bit range
    "number": (int, float),
    "boolean": (bool,),
    "timestamp": (),
}
_POLARS_TYPE: dict[str, Any] = {
    "string": pl.Utf8,
    "integer": pl.Int64,
    "number": pl.Float64,
    "boolean": pl.Boolean,
    "timestamp": pl.Datetime("us", "UTC"),
}


@dataclass(frozen=True)
class _Compiled:
    schema: pa.DataFrameSchema
    # column -> [(reason, message)] by pandera check_number
    checks: dict[str, list[tuple[str, str]]]
    properties: tuple[PropertySpec, ...]


def _column_name(prop: str) -> str:
    return f"properties.{prop}"


def _property_checks(prop: PropertySpec) -> list[tuple[pa.Check, str, str]]:
    out: list[tuple[pa.Check, str, str]] = []
    if prop.enum is not None:
        msg = "must be one of " + ", ".join(str(v) for v in prop.enum)
        out.append((pa.Check.isin(list(prop.enum), error=msg), "enum", msg))
    if prop.min is not None:
        msg = f"must be >= {prop.min}"
        out.append((pa.Check.ge(prop.min, error=msg), "min", msg))
    if prop.max is not None:
        msg = f"must be <= {prop.max}"
        out.append((pa.Check.le(prop.max, error=msg), "max", msg))
    if prop.pattern is not None:
        msg = f"must match {prop.pattern}"
        out.append((pa.Check.str_matches(prop.pattern, error=msg), "pattern", msg))
    return out


def _envelope_columns() -> dict[str, tuple[pa.Column, list[tuple[str, str]]]]:
    def length(lo: int, hi: int) -> tuple[pa.Check, str, str]:
        msg = f"must be {lo} to {hi} characters"
        return pa.Check.str_length(lo, hi, error=msg), "length", msg

    cols = {}
    for name, (lo, hi) in {"id": (1, 128), "event_type": (1, 128), "customer_id": (1, 256)}.items():
        check, reason, msg = length(lo, hi)
        cols[name] = (pa.Column(pl.Utf8, check, nullable=False), [(reason, msg)])
    return cols


@cache
def _compile(spec: EventTypeSpec) -> _Compiled:
    columns: dict[str, pa.Column] = {}
    checks: dict[str, list[tuple[str, str]]] = {}
    for name, (column, reasons) in _envelope_columns().items():
        columns[name] = column
        checks[name] = reasons
    for prop in spec.properties:
        col = _column_name(prop.name)
        triples = _property_checks(prop)
        columns[col] = pa.Column(
            _POLARS_TYPE[prop.type], [c for c, _, _ in triples], nullable=not prop.required
        )
        checks[col] = [(reason, msg) for _, reason, msg in triples]
    schema = pa.DataFrameSchema(columns, name=f"event_type:{spec.name}", strict=False, coerce=False)
    return _Compiled(schema, checks, spec.properties)


def _typed(ptype: str, value: Any) -> tuple[Any, str | None]:
    """``(typed value, None)`` or ``(None, error message)`` for one property value."""
    if ptype == "string":
        return (value, None) if isinstance(value, str) else (None, "must be a string")
    if ptype == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            if _INT64_MIN <= value <= _INT64_MAX:
                return value, None
            return None, "is out of the 64-bit integer range"
        return None, "must be an integer"
    if ptype == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value), None
        return None, "must be a number"
    if ptype == "boolean":
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if isinstance(value, str):
        try:
            return parse_timestamp(value), None
        except ValueError as exc:
            return None, str(exc)
    return None, "must be an RFC 3339 timestamp string"


def validate_event_type(
    spec: EventTypeSpec,
    ids: list[str],
    customer_ids: list[str],
    properties: list[dict[str, Any]],
) -> dict[int, list[Failure]]:
    """Validate the events of one type (given as columns); return failures by row index.

    An empty answer means every row passed. Timestamps are not among the columns: they were
    checked when the event was decoded (at the gateway, or for direct publishes by the pipeline).
    """
    compiled = _compile(spec)
    failures: dict[int, list[Failure]] = {}
    data: dict[str, pl.Series] = {
        "id": pl.Series("id", ids, dtype=pl.Utf8),
        "event_type": pl.Series("event_type", [spec.name] * len(ids), dtype=pl.Utf8),
        "customer_id": pl.Series("customer_id", customer_ids, dtype=pl.Utf8),
    }
    for prop in compiled.properties:
        col = _column_name(prop.name)
        if "." in prop.name:
            values = [property_at(p, prop.name) for p in properties]
        else:
            values = [p.get(prop.name) for p in properties]
        # One cheap pass finds the values of the wrong JSON type; only those go through _typed.
        allowed = _JSON_TYPES[prop.type]
        check_range = prop.type == "integer"
        for i, raw in enumerate(values):
            if raw is not None and (
                type(raw) not in allowed or (check_range and not _INT64_MIN <= raw <= _INT64_MAX)
            ):
                typed, error = _typed(prop.type, raw)
                values[i] = typed
                if error is not None:
                    failures.setdefault(i, []).append(Failure(col, "type", error))
        data[col] = pl.Series(col, values, dtype=_POLARS_TYPE[prop.type])
    try:
        compiled.schema.validate(pl.DataFrame(data), lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases.select("column", "check_number", "index", "check").rows()
        for column, check_number, index, check in cases:
            if index is None:
                continue
            if check == "not_nullable":
                reason, message = "required", "is required"
            elif (
                check_number is not None
                and column in compiled.checks
                and check_number < len(compiled.checks[column])
            ):
                reason, message = compiled.checks[column][check_number]
            else:
                reason, message = "invalid", str(check)
            # A value of the wrong type already has its reason; pandera then sees a null there.
            if reason == "required" and any(f.field == column for f in failures.get(index, [])):
                continue
            failures.setdefault(index, []).append(Failure(column, reason, message))
    return failures


def validate_catalog_types(catalog: Catalog) -> None:
    """Build every event type's schema once, so a catalog pandera cannot use fails at start-up."""
    for spec in catalog.event_types.values():
        _compile(spec)
