"""Access: API keys (scopes, customer binding, rate limits) and the audit log of admin actions.

Plain functions on a psycopg connection; the gateway's checks live in ``ingest_gateway/auth.py``.
"""

from meter_platform.access.audit import list_audit, record
from meter_platform.access.keys import (
    KEY_PREFIX,
    SCOPES,
    ApiKey,
    create_key,
    ensure_key_file,
    find_key,
    hash_key,
    list_keys,
    new_key,
    revoke_key,
)

__all__ = [
    "KEY_PREFIX",
    "SCOPES",
    "ApiKey",
    "create_key",
    "ensure_key_file",
    "find_key",
    "hash_key",
    "list_audit",
    "list_keys",
    "new_key",
    "record",
    "revoke_key",
]
