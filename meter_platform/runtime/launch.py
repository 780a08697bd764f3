"""How the platform's processes are launched: their command lines and environment.

The one definition for ``meter up`` (:mod:`meter_platform.runtime.up`) and for the ingest benchmark
(``bench/ingest_bench.py``), so the benchmark measures the gateway exactly as ``meter up`` runs it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

#: The gateway's ASGI application factory (``uvicorn --factory`` / ``granian --factory``).
GATEWAY_APP = "ingest_gateway.app:create_app"
#: The ASGI servers the gateway can run on (``METER_GATEWAY_SERVER``); the first is the default.
#: granian is optional (not a dependency): measured here it served no more requests than uvicorn and
#: used more CPU for each (bench/gateways.py).
GATEWAY_SERVERS = ("uvicorn", "granian")


def installed_servers() -> list[str]:
    """The servers of :data:`GATEWAY_SERVERS` installed next to this Python."""
    return [name for name in GATEWAY_SERVERS if (bin_dir() / name).exists()]


def bin_dir() -> Path:
    """The folder of this Python's console scripts (uvicorn, dagster-webserver, dagster-daemon)."""
    return Path(sys.executable).parent


#: prometheus_client's multiprocess mode: each worker writes its metrics to files in this folder.
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def gateway_workers() -> int:
    """``METER_GATEWAY_WORKERS`` (the server's ``--workers``: gateway processes on one port), else 1."""
    return int(os.environ.get("METER_GATEWAY_WORKERS", "1"))


def gateway_server() -> str:
    """``METER_GATEWAY_SERVER``: the ASGI server of the gateway, one of :data:`GATEWAY_SERVERS`."""
    server = os.environ.get("METER_GATEWAY_SERVER", "").strip().lower() or GATEWAY_SERVERS[0]
    if server not in GATEWAY_SERVERS:
        raise SystemExit(f"METER_GATEWAY_SERVER={server!r}: use one of {', '.join(GATEWAY_SERVERS)}.")
    return server


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


def gateway_command(
    host: str, port: int, workers: int | str | None = None, server: str | None = None
) -> list[str]:
    """The gateway served on ``host:port`` by ``server`` (default ``METER_GATEWAY_SERVER``, else uvicorn).

    ``workers`` is the server's ``--workers`` (processes sharing the port); by default
    ``METER_GATEWAY_WORKERS``, else 1. Both servers run the same app with its lifespan, log warnings
    only (no access log), and replace a worker process that dies.
    """
    if workers is None:
        workers = gateway_workers()
    if (server or gateway_server()) == "granian":
        granian = bin_dir() / "granian"
        if not granian.exists():
            raise SystemExit(
                "METER_GATEWAY_SERVER=granian: granian is not installed here (it is optional): "
                f"{bin_dir() / 'pip'} install granian"
            )
        return [
            str(granian),
            "--interface",
            "asgi",
            "--factory",
            GATEWAY_APP,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-ws",
            "--log-level",
            "warning",
            "--respawn-failed-workers",
        ]
    return [
        str(bin_dir() / "uvicorn"),
        "--factory",
        GATEWAY_APP,
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        # The gateway reads nothing of X-Forwarded-For / -Proto (keys identify callers, not
        # addresses): not parsing them saves their middleware on every request.
        "--no-proxy-headers",
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
