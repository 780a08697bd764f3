"""What every ``meter`` command group shares: where the gateway and the database are, and tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from meter_platform.config import load_settings


def gateway_url(args: argparse.Namespace) -> str:
    """``--gateway``, else the gateway of the running ``meter up``, else the configured host and port."""
    if getattr(args, "gateway", None):
        return args.gateway.rstrip("/")
    from meter_platform.runtime.up import read_runtime

    runtime = read_runtime()
    if runtime.get("gateway_url"):
        return runtime["gateway_url"]
    settings = load_settings()
    return f"http://{settings.gateway_host}:{settings.gateway_port}"


def api_key() -> str | None:
    """METER_API_KEY, else the key the first `meter up` wrote to ``.meter/api-key`` (None: neither)."""
    from meter_platform.access.keys import KEY_FILE

    settings = load_settings()
    if settings.api_key:
        return settings.api_key
    path = settings.data_dir / KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header every request to the gateway sends (empty without a key)."""
    key = api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def database_url() -> str:
    """METER_DATABASE_URL, or the database of the running `meter up`."""
    from meter_platform.runtime.up import read_runtime

    url = load_settings().database_url or read_runtime().get("database_url")
    if not url:
        raise RuntimeError(
            "METER_DATABASE_URL is not set and no `meter up` is running here (.meter/runtime.json); "
            "start the platform or export METER_DATABASE_URL"
        )
    return url


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())
