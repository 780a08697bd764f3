"""API keys: long random tokens with a recognisable prefix; only their SHA-256 is stored.

A key has scopes (``ingest``: send events; ``read``: read events, usage, invoices, status, quarantine,
meters; ``admin``: everything), may be bound to one customer, and has its own rate limits.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from meter_platform.access.audit import record
from meter_platform.capture.envelope import format_timestamp
from meter_platform.errors import InvalidRequest, NotFound

KEY_PREFIX = "mk_live_"
SCOPES = ("ingest", "read", "admin")
#: Default rate limits of a key (token buckets of one second).
DEFAULT_EVENTS_PER_SECOND = 100_000.0
DEFAULT_REQUESTS_PER_SECOND = 1_000.0
#: The file ``meter up`` writes the first admin key to, in the data directory (``.meter/``).
KEY_FILE = "api-key"


@dataclass(frozen=True)
class ApiKey:
    """A key as stored (never the key itself)."""

    id: str
    prefix: str
    name: str | None
    scopes: tuple[str, ...]
    customer_id: str | None
    events_per_second: float
    requests_per_second: float
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """The key's row as the CLI and the API show it."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "scopes": list(self.scopes),
            "customer_id": self.customer_id,
            "events_per_second": self.events_per_second,
            "requests_per_second": self.requests_per_second,
            "created_at": format_timestamp(self.created_at),
            "last_used_at": format_timestamp(self.last_used_at) if self.last_used_at else None,
            "revoked_at": format_timestamp(self.revoked_at) if self.revoked_at else None,
        }


_COLUMNS = (
    "id, prefix, name, scopes, customer_id, events_per_second, requests_per_second,"
    " created_at, last_used_at, revoked_at"
)


def _key(row: Any) -> ApiKey:
    return ApiKey(row[0], row[1], row[2], tuple(row[3]), row[4], float(row[5]), float(row[6]), *row[7:10])


def new_key() -> str:
    """A fresh random key: the prefix and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key (right for long random tokens: no salt or slow hash needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _check_scopes(scopes: list[str]) -> tuple[str, ...]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InvalidRequest(f"Scopes are {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}.")
    return tuple(dict.fromkeys(scopes))


def create_key(
    conn: psycopg.Connection,
    scopes: list[str],
    *,
    name: str | None = None,
    customer_id: str | None = None,
    events_per_second: float = DEFAULT_EVENTS_PER_SECOND,
    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
    actor: str = "cli",
) -> tuple[ApiKey, str]:
    """Store a new key (its hash) and audit it, in the caller's transaction; the key and its secret."""
    checked = _check_scopes(scopes)
    if events_per_second <= 0 or requests_per_second <= 0:
        raise InvalidRequest("Rate limits must be positive.")
    secret = new_key()
    key_id = "key_" + secrets.token_hex(8)
    row = conn.execute(
        f"INSERT INTO api_keys (id, key_hash, prefix, name, scopes, customer_id, events_per_second,"
        f" requests_per_second) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (key_id, hash_key(secret), secret[: len(KEY_PREFIX) + 4], name, list(checked), customer_id,
         events_per_second, requests_per_second),
    ).fetchone()  # fmt: skip
    assert row is not None
    key = _key(row)
    record(
        conn, actor, "key.create", key_id, {"scopes": list(checked), "name": name, "customer_id": customer_id}
    )
    return key, secret


def list_keys(conn: psycopg.Connection) -> list[ApiKey]:
    """Every key, oldest first."""
    return [_key(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")]


def revoke_key(conn: psycopg.Connection, key_id: str, actor: str = "cli") -> ApiKey:
    """Revoke a key (kept, marked revoked) and audit it; NotFound for an unknown id."""
    row = conn.execute(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s RETURNING {_COLUMNS}",
        (key_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"No key {key_id!r}; `meter keys list` shows them.")
    record(conn, actor, "key.revoke", key_id)
    return _key(row)


def find_key(conn: psycopg.Connection, secret: str) -> ApiKey | None:
    """The active key whose hash matches ``secret`` (None when unknown or revoked)."""
    digest = hash_key(secret)
    row = conn.execute(f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE key_hash = %s", (digest,)).fetchone()
    if row is None or not hmac.compare_digest(row[10], digest) or row[9] is not None:
        return None
    return _key(row)


def ensure_key_file(database_url: str, data_dir: Path) -> str | None:
    """Make sure ``data_dir/api-key`` holds a working admin key (mode 0600).

    Creates an admin key when the file is missing or its key is unknown or revoked (a new database),
    and returns it (to be printed once); None when the file already holds a working key.
    """
    from meter_platform.storage import db

    path = data_dir / KEY_FILE
    with db.connect(database_url) as conn:
        if path.exists():
            current = path.read_text().strip()
            if current and find_key(conn, current) is not None:
                return None
        _, secret = create_key(conn, ["admin"], name="meter up (first admin key)")
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        conn.commit()
    return secret
