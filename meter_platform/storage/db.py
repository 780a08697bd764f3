"""PostgreSQL access: connection URLs, connections and versioned migrations.

The hot path (the micro-batch writer) uses psycopg directly for COPY; everything else goes through
SQLAlchemy engines built here.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 0x6D65746572  # "meter"


def libpq_url(url: str) -> str:
    """The URL as libpq (psycopg) takes it: ``postgresql://...`` without a SQLAlchemy driver suffix."""
    _, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r} (expected postgresql://user@host:port/dbname)")
    return "postgresql://" + rest


def sqlalchemy_url(url: str, *, driver: str = "psycopg") -> str:
    """The URL with the psycopg 3 driver, for SQLAlchemy."""
    return f"postgresql+{driver}://" + libpq_url(url).partition("://")[2]


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A new psycopg connection (autocommit off)."""
    return psycopg.connect(libpq_url(url), **kwargs)


def engine(url: str) -> Engine:
    """A pooled SQLAlchemy engine."""
    return create_engine(sqlalchemy_url(url), pool_pre_ping=True)


def async_engine(url: str) -> AsyncEngine:
    """A pooled async SQLAlchemy engine (the gateway's). A new connection gives up after 5 s, so a frozen
    or unreachable PostgreSQL makes requests fail (503) instead of hanging."""
    return create_async_engine(
        sqlalchemy_url(url),
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
        connect_args={"connect_timeout": 5},
    )


def migrations() -> list[tuple[int, str, str]]:
    """Every migration file as ``(version, name, sql)``, in order."""
    out = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        out.append((int(version), name, path.read_text()))
    return out


def migrate(url: str) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction; return those applied.

    Safe to run from several processes at once: an advisory lock serializes them.
    """
    applied: list[int] = []
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


def with_database(url: str, dbname: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(path="/" + dbname))


def ensure_database(url: str) -> None:
    """Create the URL's database if the server does not have it yet (needs CREATEDB on the server)."""
    from psycopg import sql

    dbname = urlsplit(libpq_url(url)).path.lstrip("/") or "postgres"
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
