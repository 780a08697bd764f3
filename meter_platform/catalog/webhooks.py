"""Inbound webhooks: ``webhooks.yaml`` in the catalog folder, checked at load with every mistake listed.

Each source is served at ``POST /v1/webhooks/<source>``: the gateway checks the sender's HMAC-SHA256
signature (:mod:`ingest_gateway.webhook_signatures`), then maps the payload to events
(:mod:`meter_platform.catalog.webhook_mapping`). This module only reads and checks the configuration:
no HTTP, no environment (the secret's variable is named here and read by the gateway).

A signature is described by a preset (``stripe``, ``github``, ``svix``) or by its parts; see the
example catalog's ``webhooks.yaml`` for the format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

WEBHOOKS_FILE = "webhooks.yaml"
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: A dotted path: segments of letters, digits, _ and - (a number indexes a list); ``$.`` = from the top.
_PATH = re.compile(r"^(\$\.)?[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$|^\$$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
PLACEHOLDERS = ("{id}", "{timestamp}", "{body}")
ENCODINGS = ("hex", "base64")
SECRET_ENCODINGS = ("text", "base64")
_SIGNATURE_KEYS = {
    "preset",
    "header",
    "separator",
    "prefix",
    "encoding",
    "timestamp",
    "signed",
    "tolerance_seconds",
    "secret_encoding",
}
_SOURCE_KEYS = {"secret_env", "signature", "delivery_id", "events", "description"}
_EVENT_KEYS = {"items", "event_type", "customer_id", "timestamp", "properties"}


@dataclass(frozen=True)
class Ref:
    """Where a value comes from: a request ``header``, a dotted ``path`` into the payload, or a
    constant (``const``). A path starting with ``$.`` is read from the delivery's top level, any other
    from the current item of a fan-out (the delivery itself without one)."""

    header: str | None = None
    path: str | None = None
    const: Any = None
    element: str | None = None  # for a timestamp: the signature header's element with this prefix


@dataclass(frozen=True)
class Signature:
    """How a sender signs: HMAC-SHA256 of ``signed`` (``{id}``, ``{timestamp}``, ``{body}`` filled in),
    found in ``header`` as one or more ``prefix<signature>`` elements split by ``separator``."""

    header: str
    prefix: str = ""
    separator: str | None = None
    encoding: str = "hex"
    timestamp: Ref | None = None
    signed: str = "{body}"
    tolerance_seconds: int = 300
    secret_encoding: str = "text"  # base64: the secret is base64 (a ``whsec_`` prefix is dropped)


#: What each preset means (a mapping may start from one and change any part).
PRESETS: dict[str, tuple[Signature, Ref]] = {
    # Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]; the secret (whsec_...) is used as text.
    "stripe": (
        Signature(
            header="Stripe-Signature",
            separator=",",
            prefix="v1=",
            timestamp=Ref(element="t="),
            signed="{timestamp}.{body}",
        ),
        Ref(path="$.id"),
    ),
    # X-Hub-Signature-256: sha256=<hex>; no timestamp (GitHub signs the body only).
    "github": (
        Signature(header="X-Hub-Signature-256", prefix="sha256="),
        Ref(header="X-GitHub-Delivery"),
    ),
    # svix-signature: v1,<base64> [v1,<base64> ...] over "{svix-id}.{svix-timestamp}.{body}";
    # the secret is whsec_<base64>.
    "svix": (
        Signature(
            header="svix-signature",
            separator=" ",
            prefix="v1,",
            encoding="base64",
            timestamp=Ref(header="svix-timestamp"),
            signed="{id}.{timestamp}.{body}",
            secret_encoding="base64",
        ),
        Ref(header="svix-id"),
    ),
}


@dataclass(frozen=True)
class EventMapping:
    """How a payload becomes events: one per delivery, or one per element of the list at ``items``."""

    event_type: Ref
    customer_id: Ref
    items: str | None = None
    timestamp: Ref | None = None  # None: the gateway's receive time
    properties: Ref | dict[str, Ref] = field(default_factory=dict)  # a path to an object, or names


@dataclass(frozen=True)
class WebhookSource:
    """One sender, served at ``POST /v1/webhooks/<name>``."""

    name: str
    secret_env: tuple[str, ...]  # variables holding the secret (several while rotating it)
    signature: Signature
    delivery_id: Ref
    events: EventMapping


class _Problems:
    """Mistakes of one source, each prefixed with where it is."""

    def __init__(self, where: str, out: list[str]):
        self.where, self.out = where, out

    def add(self, message: str) -> None:
        self.out.append(f"{self.where}: {message}")


def load_webhooks(
    path: Path, event_types: Mapping[str, Any] | None, errors: list[str]
) -> dict[str, WebhookSource]:
    """Read ``webhooks.yaml`` (none: no sources) and append every problem to ``errors``.

    ``event_types`` (name to its spec, None: any type is accepted) checks a constant ``event_type``.
    """
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        errors.append(f"{WEBHOOKS_FILE} is not valid YAML: {exc}")
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("sources") or {}, dict):
        errors.append(f"{WEBHOOKS_FILE}: expected a mapping with the sources under `sources:`.")
        return {}
    unknown = set(doc) - {"sources"}
    if unknown:
        errors.append(f"{WEBHOOKS_FILE}: unknown top-level key(s) {sorted(unknown)}; use `sources:`.")
    out: dict[str, WebhookSource] = {}
    for name, raw in (doc.get("sources") or {}).items():
        problems = _Problems(f"{WEBHOOKS_FILE}: source {name!r}", errors)
        before = len(errors)
        if not isinstance(name, str) or not _SOURCE.match(name):
            problems.add(
                "the name must be lower-case letters, digits, _ and - (at most 64): it is in the URL."
            )
        source = parse_source(str(name), raw, event_types, problems)
        if source is not None and len(errors) == before:
            out[source.name] = source
    return out


def parse_source(
    name: str, raw: Any, event_types: Mapping[str, Any] | None, problems: _Problems
) -> WebhookSource | None:
    """One source's declaration, or None (its problems added)."""
    if not isinstance(raw, dict):
        problems.add("expected a mapping with secret_env, signature and events.")
        return None
    unknown = set(raw) - _SOURCE_KEYS - {"secret"}
    if unknown:
        problems.add(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_SOURCE_KEYS)}.")
    if "secret" in raw:
        problems.add("a secret must not be written in the file; name its environment variable in secret_env.")
    secret_env = _secret_env(raw.get("secret_env"), problems)
    signature, default_id = _signature(raw.get("signature"), problems)
    delivery_id = default_id
    if raw.get("delivery_id") is not None:
        delivery_id = _ref("delivery_id", raw["delivery_id"], problems, header=True, const=False)
    if delivery_id is None and signature is not None:
        problems.add(
            "delivery_id is required (e.g. {header: X-Delivery-Id} or {path: id}): retries are recognised by it."
        )
    mapping = _events(raw.get("events"), event_types, problems)
    if signature is None or delivery_id is None or mapping is None or not secret_env:
        return None
    return WebhookSource(name, secret_env, signature, delivery_id, mapping)


def _secret_env(value: Any, problems: _Problems) -> tuple[str, ...]:
    names = value if isinstance(value, list) else [value]
    if value is None or not names or not all(isinstance(n, str) and _ENV.match(n) for n in names):
        problems.add(
            "secret_env must name the environment variable holding the secret (or a list of them, while rotating)."
        )
        return ()
    return tuple(names)


def _signature(raw: Any, problems: _Problems) -> tuple[Signature | None, Ref | None]:
    """The signature settings (a preset's name, or a mapping) and the preset's delivery id, if any."""
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        problems.add(f"signature must be a preset ({', '.join(PRESETS)}) or a mapping (header, prefix, ...).")
        return None, None
    unknown = set(raw) - _SIGNATURE_KEYS
    if unknown:
        problems.add(f"signature: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SIGNATURE_KEYS)}.")
    preset = raw.get("preset")
    base, default_id = None, None
    if preset is not None:
        if preset not in PRESETS:
            problems.add(f"signature: preset {preset!r} is not one of {', '.join(PRESETS)}.")
            return None, None
        base, default_id = PRESETS[preset]
    elif not isinstance(raw.get("header"), str) or not raw["header"]:
        problems.add("signature: header is required without a preset (the header holding the signature).")
        return None, None
    sig = base or Signature(header=raw["header"])
    changes: dict[str, Any] = {}
    for key in ("header", "prefix", "separator", "signed"):
        if key in raw:
            if not isinstance(raw[key], str) or (key != "prefix" and not raw[key]):
                problems.add(f"signature: {key} must be a non-empty string.")
            else:
                changes[key] = raw[key]
    for key, allowed in (("encoding", ENCODINGS), ("secret_encoding", SECRET_ENCODINGS)):
        if key in raw:
            if raw[key] not in allowed:
                problems.add(f"signature: {key} {raw[key]!r} is not one of {', '.join(allowed)}.")
            else:
                changes[key] = raw[key]
    if "tolerance_seconds" in raw:
        value = raw["tolerance_seconds"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.add("signature: tolerance_seconds must be a whole number of seconds, at least 1.")
        else:
            changes["tolerance_seconds"] = value
    if "timestamp" in raw:
        changes["timestamp"] = _timestamp_ref(raw["timestamp"], problems)
    sig = replace(sig, **changes)
    _check_signed(sig, problems)
    return sig, default_id


def _timestamp_ref(raw: Any, problems: _Problems) -> Ref | None:
    if raw is None:
        return None
    if (
        isinstance(raw, dict)
        and set(raw) == {"element"}
        and isinstance(raw["element"], str)
        and raw["element"]
    ):
        return Ref(element=raw["element"])
    if isinstance(raw, dict) and set(raw) == {"header"} and isinstance(raw["header"], str) and raw["header"]:
        return Ref(header=raw["header"])
    problems.add(
        "signature: timestamp must be {header: <name>} or {element: <prefix>} (an element of the "
        "signature header, e.g. t= for Stripe)."
    )
    return None


def _check_signed(sig: Signature, problems: _Problems) -> None:
    """The signed content must cover the body once, and use only known placeholders."""
    used = _PLACEHOLDER.findall(sig.signed)
    strange = sorted(set(used) - set(PLACEHOLDERS))
    if strange:
        problems.add(f"signature: signed uses {strange}; only {', '.join(PLACEHOLDERS)} are known.")
    if used.count("{body}") != 1:
        problems.add("signature: signed must hold {body} exactly once (the signature must cover the body).")
    if "{timestamp}" in used and sig.timestamp is None:
        problems.add("signature: signed uses {timestamp} but no timestamp is configured.")
    if sig.timestamp is not None and "{timestamp}" not in used:
        problems.add("signature: a timestamp that is not signed proves nothing; put {timestamp} in signed.")
    if sig.timestamp is not None and sig.timestamp.element is not None and not sig.separator:
        problems.add("signature: a timestamp element needs a separator (the elements of the header).")


def _ref(what: str, raw: Any, problems: _Problems, *, header: bool = False, const: bool = True) -> Ref | None:
    """A value's source: a dotted path (a string), ``{path: ...}``, ``{const: ...}`` or ``{header: ...}``."""
    spec = {"path": raw} if isinstance(raw, str) else raw
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, value),) = spec.items()
        if kind == "path" and isinstance(value, str) and _PATH.match(value):
            return Ref(path=value)
        if kind == "const" and const and isinstance(value, str | int | float | bool) and value != "":
            return Ref(const=value)
        if kind == "header" and header and isinstance(value, str) and value:
            return Ref(header=value)
    kinds = ["a dotted path (e.g. data.object.customer, or $.created for the delivery's top level)"]
    if const:
        kinds.append("{const: <value>}")
    if header:
        kinds.append("{header: <name>}")
    problems.add(f"{what} must be {' or '.join(kinds)}; got {raw!r}.")
    return None


def _events(raw: Any, event_types: Mapping[str, Any] | None, problems: _Problems) -> EventMapping | None:
    if not isinstance(raw, dict):
        problems.add(
            "events is required: a mapping with event_type, customer_id and optionally items, timestamp, properties."
        )
        return None
    unknown = set(raw) - _EVENT_KEYS
    if unknown:
        problems.add(f"events: unknown key(s) {sorted(unknown)}; allowed: {sorted(_EVENT_KEYS)}.")
    before = len(problems.out)
    items = raw.get("items")
    if items is not None and (not isinstance(items, str) or not _PATH.match(items) or items.startswith("$")):
        problems.add(
            "events.items must be a dotted path to the list to fan out (e.g. data.object.lines.data)."
        )
    refs: dict[str, Ref | None] = {}
    for key in ("event_type", "customer_id"):
        if raw.get(key) is None:
            problems.add(f"events.{key} is required (a dotted path or {{const: <value>}}).")
        else:
            refs[key] = _ref(f"events.{key}", raw[key], problems)
    timestamp = (
        _ref("events.timestamp", raw["timestamp"], problems, const=False) if raw.get("timestamp") else None
    )
    properties = _properties(raw.get("properties"), problems)
    event_type = refs.get("event_type")
    if event_type is not None and event_type.const is not None and event_types is not None:
        _check_event_type(str(event_type.const), properties, event_types, problems)
    if len(problems.out) > before or refs.get("event_type") is None or refs.get("customer_id") is None:
        return None
    assert event_type is not None and refs["customer_id"] is not None and properties is not None
    return EventMapping(event_type, refs["customer_id"], items, timestamp, properties)


def _properties(raw: Any, problems: _Problems) -> Ref | dict[str, Ref] | None:
    if raw is None:
        return {}
    if isinstance(raw, str):
        return _ref("events.properties", raw, problems, const=False)
    if not isinstance(raw, dict):
        problems.add("events.properties must be a path to an object or a mapping of property name to path.")
        return None
    out: dict[str, Ref] = {}
    for name, value in raw.items():
        ref = _ref(f"events.properties.{name}", value, problems)
        if not isinstance(name, str) or not name:
            problems.add(f"events.properties: {name!r} is not a property name.")
        elif ref is not None:
            out[name] = ref
    return out


def _check_event_type(
    name: str, properties: Ref | dict[str, Ref] | None, event_types: Mapping[str, Any], problems: _Problems
) -> None:
    """A constant event type must be declared, and its required properties mapped."""
    spec = event_types.get(name)
    if spec is None:
        problems.add(f"events.event_type {name!r} is not declared in events.yaml.")
        return
    if isinstance(properties, dict):
        missing = [p.name for p in spec.properties if p.required and p.name not in properties]
        if missing:
            problems.add(f"events.properties: event type {name!r} requires {missing}; map them.")
