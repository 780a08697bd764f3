"""Alert channels: ``alerts.yaml`` in the catalog folder (a signed webhook, the log), checked at load
with every mistake listed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHANNEL_TYPES = ("webhook", "log")
#: Severities from the least to the most severe.
SEVERITIES = ("WARN", "ERROR")
ALERTS_FILE = "alerts.yaml"

_WEBHOOK_KEYS = {"name", "type", "url", "url_env", "secret_env", "min_severity"}
_LOG_KEYS = {"name", "type", "min_severity"}


class AlertConfigError(ValueError):
    """``alerts.yaml`` cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class AlertChannel:
    """Where notices go: a webhook (``url`` and HMAC ``secret``) or the log."""

    name: str
    type: str
    min_severity: str = "WARN"
    url: str | None = None
    secret: str | None = field(default=None, repr=False)

    def accepts(self, severity: str) -> bool:
        """True when a failure of this severity is alerted on this channel."""
        return SEVERITIES.index(severity) >= SEVERITIES.index(self.min_severity)


#: The channels when the catalog folder has no alerts.yaml.
DEFAULT_CHANNELS = (AlertChannel(name="log", type="log"),)


def alerts_path(catalog_dir: str | Path) -> Path:
    """Where ``alerts.yaml`` is: next to ``meters.yaml`` and ``events.yaml`` in the catalog folder."""
    return Path(catalog_dir) / ALERTS_FILE


def load_channels(path: Path, environ: Mapping[str, str] | None = None) -> list[AlertChannel]:
    """Read and check ``alerts.yaml`` (see the example catalog's for the format).

    A missing file means the log channel only. Secrets and URLs named by ``secret_env``/``url_env`` are
    read from ``environ`` (default: the process environment). Raises :class:`AlertConfigError` listing
    every problem.
    """
    env = os.environ if environ is None else environ
    if not path.exists():
        return list(DEFAULT_CHANNELS)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AlertConfigError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("channels", []), list):
        raise AlertConfigError(f"{path}: expected a mapping with a list under `channels:`")
    unknown_top = set(doc) - {"channels"}
    problems: list[str] = [f"unknown top-level key(s) {sorted(unknown_top)}"] if unknown_top else []
    channels: list[AlertChannel] = []
    seen: set[str] = set()
    for index, item in enumerate(doc.get("channels") or []):
        where = f"channels[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with `name` and `type`")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: `name` is required (a non-empty string)")
            continue
        where = f"{where} ({name})"
        if name in seen:
            problems.append(f"{where}: another channel has this name; names must be unique")
        seen.add(name)
        channel, errors = _channel(name, item, env)
        problems.extend(f"{where}: {error}" for error in errors)
        if channel is not None and not errors:
            channels.append(channel)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise AlertConfigError(f"{path}: {len(problems)} problem(s):\n{listed}")
    return channels


def _channel(
    name: str, item: dict[str, Any], env: Mapping[str, str]
) -> tuple[AlertChannel | None, list[str]]:
    errors: list[str] = []
    kind = item.get("type")
    if kind not in CHANNEL_TYPES:
        return None, [f"unknown type {kind!r}; use one of {', '.join(CHANNEL_TYPES)}"]
    if "secret" in item:
        errors.append(
            "a secret must not be written in the file; put it in an environment variable and name "
            "that variable in `secret_env`"
        )
    allowed = _WEBHOOK_KEYS if kind == "webhook" else _LOG_KEYS
    unknown = set(item) - allowed - {"secret"}
    if unknown:
        errors.append(f"unknown key(s) {sorted(unknown)} for a {kind} channel; allowed: {sorted(allowed)}")
    min_severity = str(item.get("min_severity", "WARN")).upper()
    if min_severity not in SEVERITIES:
        errors.append(f"min_severity {item.get('min_severity')!r} is not one of {', '.join(SEVERITIES)}")
    if kind == "log":
        return AlertChannel(name=name, type=kind, min_severity=min_severity), errors

    url: str | None = None
    if ("url" in item) == ("url_env" in item):
        errors.append("a webhook needs exactly one of `url` or `url_env` (a variable holding the URL)")
    elif "url" in item:
        url = item["url"] if isinstance(item["url"], str) else None
    else:
        url = env.get(str(item["url_env"])) or None
        if url is None:
            errors.append(f"environment variable {item['url_env']} (url_env) is not set")
    if url is not None and not url.startswith(("http://", "https://")):
        errors.append(f"url {url!r} must start with http:// or https://")
    secret: str | None = None
    if "secret_env" not in item:
        errors.append("a webhook needs `secret_env`: the environment variable holding its HMAC-SHA256 key")
    else:
        secret = env.get(str(item["secret_env"])) or None
        if secret is None:
            errors.append(f"environment variable {item['secret_env']} (secret_env) is not set")
    channel = AlertChannel(name=name, type=kind, min_severity=min_severity, url=url, secret=secret)
    return channel, errors


# -- signatures ------------------------------------------------------------------------------------
