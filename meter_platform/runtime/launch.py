"""How the platform's processes are launched: their command lines and environment.

The one definition for ``meter up`` (:mod:`meter_platform.runtime.up`) and for the ingest benchmark
(``bench/ingest_bench.py``), so the benchmark measures the gateway exactly as ``meter up`` runs it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

#: The gateway's ASGI application factory (``uvicorn --factory``).
GATEWAY_APP = "ingest_gateway.app:create_app"


def bin_dir() -> Path:
    """The folder of this Python's console scripts (uvicorn, dagster-webserver, dagster-daemon)."""
    return Path(sys.executable).parent


#: prometheus_client's multiprocess mode: each worker writes its metrics to files in this folder.
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def gateway_workers() -> int:
    """``METER_GATEWAY_WORKERS`` (uvicorn's ``--workers``), else 1."""
    return int(os.environ.get("METER_GATEWAY_WORKERS", "1"))


def gateway_env(env: dict[str, str], data_dir: Path, workers: int | None = None) -> dict[str, str]:
    """The gateway's environment: with several workers, ``PROMETHEUS_MULTIPROC_DIR`` names a fresh,
    empty folder under ``data_dir``, so ``GET /metrics`` adds up every worker's counters (each worker
    counts only the requests it serves) and none are left from an earlier start."""
    if (workers if workers is not None else gateway_workers()) <= 1:
        return env
    folder = data_dir / "prometheus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {**env, PROMETHEUS_MULTIPROC_DIR: str(folder)}


def gateway_command(host: str, port: int, workers: int | str | None = None) -> list[str]:
    """uvicorn serving the gateway on ``host:port``.

    ``workers`` is uvicorn's ``--workers``; by default ``METER_GATEWAY_WORKERS``, else 1.
    """
    if workers is None:
        workers = gateway_workers()
    return [
        str(bin_dir() / "uvicorn"),
        "--factory",
        GATEWAY_APP,
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]


def dagster_webserver_command(host: str, port: int, workspace: str) -> list[str]:
    """The Dagster UI on ``host:port`` for the code locations of ``workspace`` (a workspace.yaml)."""
    return [str(bin_dir() / "dagster-webserver"), "-h", host, "-p", str(port), "-w", workspace]


def dagster_daemon_command(workspace: str) -> list[str]:
    """The Dagster daemon (schedules, sensors, run queue) for the code locations of ``workspace``."""
    return [str(bin_dir() / "dagster-daemon"), "run", "-w", workspace]


def platform_env(nats_url: str, database_url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process of the platform: this process's, plus where NATS, PostgreSQL and
    ``METER_HOME`` are, plus ``extra`` variables."""
    return {
        **os.environ,
        "METER_NATS_URL": nats_url,
        "METER_DATABASE_URL": database_url,
        **extra,
        "METER_HOME": str(home),
    }
