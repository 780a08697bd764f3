"""``meter up``: start the whole platform in the foreground, stop every process it started on Ctrl-C.

Order of start: NATS and PostgreSQL (embedded unless ``METER_NATS_URL`` / ``METER_DATABASE_URL`` say
otherwise) → migrations, stream and consumer → gateway → Dagster webserver and daemon.

``meter up --nats-cluster 3`` starts three NATS nodes as one JetStream cluster instead of the single
node (data in ``.meter/nats-cluster/n1..n3``) and keeps the events stream on all three
(``METER_STREAM_REPLICAS=3`` unless set): any one node may die without costing an accepted event.

Then it supervises them (:mod:`meter_platform.runtime.supervisor`): a process that dies is started
again, on the same port and data directory, with backoff, while the others keep serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from meter_platform.access.keys import KEY_FILE, ensure_key_file
from meter_platform.capture import jetstream
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import (
    PACKAGE_DIR,
    STREAM_NAME,
    Settings,
    load_partitions,
    load_settings,
    load_stream_replicas,
)
from meter_platform.ingestion.validation import validate_catalog_types
from meter_platform.meters.rebuild import format_report, sync_meters
from meter_platform.runtime.health import JetStreamHealth
from meter_platform.runtime.launch import (
    dagster_daemon_command,
    dagster_webserver_command,
    gateway_command,
    gateway_env,
    platform_env,
)
from meter_platform.runtime.nats_cluster import start_nats_cluster
from meter_platform.runtime.servers import (
    Server,
    port_is_free,
    spawn,
    start_nats,
    start_postgres,
    wait_for_port,
)
from meter_platform.runtime.supervisor import Supervisor
from meter_platform.storage import db

RUNTIME_FILE = "runtime.json"


def dagster_home() -> Path:
    """``dagster_home/`` of the checkout (holds dagster.yaml); DAGSTER_HOME wins when set."""
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]).resolve()
    for base in (Path.cwd(), PACKAGE_DIR.parent):
        if (base / "dagster_home" / "dagster.yaml").exists():
            return (base / "dagster_home").resolve()
    raise SystemExit(
        "dagster_home/dagster.yaml not found: run `meter up` from the project checkout, or set DAGSTER_HOME."
    )


def dagster_database_url(database_url: str) -> str:
    """Dagster's own run and event storage: database ``dagster`` beside the platform's."""
    if os.environ.get("METER_DAGSTER_DATABASE_URL"):
        return os.environ["METER_DAGSTER_DATABASE_URL"]
    return db.with_database(database_url, "dagster")


def max_concurrent_runs() -> str:
    """Dagster's run limit (``max_concurrent_runs`` in dagster.yaml): ``METER_MAX_CONCURRENT_RUNS`` when
    set, else two ingest runs per partition (dagster.yaml's limit per ``meter/pipeline`` value: a warm
    run and a busy one) and four for the rest (invoices, checks, the archive, a run started by hand)."""
    return os.environ.get("METER_MAX_CONCURRENT_RUNS") or str(2 * load_partitions() + 4)


def _say(message: str) -> None:
    print(f"[meter] {message}", flush=True)


@dataclass
class Platform:
    """The processes ``meter up`` started and supervises, stopped in reverse order."""

    settings: Settings
    supervisor: Supervisor = field(default_factory=lambda: Supervisor(_say))

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], port: int | None = None) -> Server:
        """Start ``cmd`` as a supervised child; with ``port``, a (re)start waits until it listens."""
        log = self.settings.data_dir / "logs" / f"{name}.log"

        def start() -> Server:
            server = Server(name, spawn(cmd, log, env=env), "", log, whole_group=True)
            if port is not None:
                try:
                    wait_for_port(self.settings.gateway_host, port, server.process, name, log)
                except Exception:
                    server.stop()
                    raise
            return server

        return self.supervisor.add(name, start)

    def stop(self) -> None:
        """Stop everything started, newest first (Dagster and gateway before the servers they use)."""
        self.supervisor.stop()
        (self.settings.data_dir / RUNTIME_FILE).unlink(missing_ok=True)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _check_ports(settings: Settings) -> None:
    for what, port in (("gateway", settings.gateway_port), ("Dagster UI", settings.dagster_port)):
        if not port_is_free(settings.gateway_host, port):
            raise SystemExit(
                f"Port {port} for the {what} is taken (is another `meter up` running?). Stop it, or set "
                f"{'METER_GATEWAY_PORT' if what == 'gateway' else 'METER_DAGSTER_PORT'} to a free port."
            )


def _embedded_nats(platform: Platform, settings: Settings) -> str:
    """Start (and supervise) the embedded nats-server; its URL."""
    _say("starting NATS with JetStream (file store in .meter/nats, fsync before every ack)")
    nats_dir = settings.data_dir / "nats"
    nats = start_nats(nats_dir)
    nats_port = _port(nats.url)
    platform.supervisor.add(
        "nats",
        lambda: start_nats(nats_dir, port=nats_port),
        server=nats,
        check=JetStreamHealth(nats_dir, nats.log, _say),
    )
    return nats.url


def _embedded_nats_cluster(platform: Platform, settings: Settings, nodes: int) -> str:
    """Start (and supervise, node by node) an embedded NATS cluster; its URL list.

    The stream gets a replica on each of three nodes (``METER_STREAM_REPLICAS``, unless set), in this
    process and in every child started after (their environment copies it).
    """
    os.environ.setdefault("METER_STREAM_REPLICAS", "3")
    if (settings.data_dir / "nats" / "jetstream").exists():
        _say("note: the single node's store .meter/nats is not used by the cluster; events it still holds "
             "are drained only by a `meter up` without --nats-cluster")  # fmt: skip
    _say(f"starting a {nodes}-node NATS cluster with JetStream (stores in .meter/nats-cluster/n1..n{nodes})")
    cluster = start_nats_cluster(settings.data_dir / "nats-cluster", nodes)
    for node in cluster.nodes:
        assert node.server is not None
        # A node may be briefly unavailable while the cluster elects leaders: more probes before a restart.
        check = JetStreamHealth(node.store_dir, node.server.log, _say, unavailable_probes=4)
        platform.supervisor.add(f"nats-{node.name}", node.start, server=node.server, check=check)
        _say(f"NATS node {node.name}  {node.url}   (cluster port {node.cluster_port})")
    return cluster.url


def _embedded_postgres(platform: Platform, settings: Settings) -> str:
    """Start (and supervise) the embedded PostgreSQL; its URL."""
    _say("starting PostgreSQL (data in .meter/pg)")
    pg_dir, databases = settings.data_dir / "pg", ("meter", "dagster")
    pg = start_postgres(pg_dir, databases=databases)
    pg_port = _port(pg.url)
    platform.supervisor.add(
        "postgres", lambda: start_postgres(pg_dir, port=pg_port, databases=databases), server=pg
    )
    return pg.url


def _prepare_database(database_url: str, catalog: Catalog) -> str:
    """Create the databases when missing, migrate, make meters.yaml's changes active; Dagster's URL."""
    dagster_db = dagster_database_url(database_url)
    for url in (database_url, dagster_db):
        try:
            db.ensure_database(url)
        except Exception as exc:
            raise RuntimeError(
                f"cannot reach or create the database {url} ({exc}). Check METER_DATABASE_URL "
                "(postgresql://user:password@host:port/dbname), or create the database and grant CREATE."
            ) from exc
    applied = db.migrate(database_url)
    _say(
        f"database schema up to date ({'applied migrations ' + str(applied) if applied else 'no new migrations'})"
    )
    # Meters added or changed in meters.yaml since the last start become active here, their
    # aggregates rebuilt from the stored raw events (the Dagster sensor does it while running).
    with db.connect(database_url, autocommit=True) as conn:
        reports = sync_meters(conn, catalog, progress=_say)
    fresh = [r.slug for r in reports if r.kind == "added" and not r.events]
    if fresh:
        _say(f"activated {len(fresh)} new meter(s): {', '.join(fresh)}")
    for report in reports:
        if report.slug not in fresh:
            _say(format_report(report, limit=5))
    return dagster_db


def _api_key(settings: Settings, database_url: str) -> None:
    """The first start creates an admin key, prints it once and leaves it in .meter/api-key (0600) for
    `meter`, the demo and the SDK; with METER_AUTH=disabled, say loudly that anyone may call anything."""
    if not settings.auth_enabled:
        for _ in range(3):
            _say("WARNING: METER_AUTH=disabled: the gateway accepts every request WITHOUT an API key.")
        _say("WARNING: use this for local experiments only; never expose this gateway.")
        return
    path = settings.data_dir / KEY_FILE
    secret = ensure_key_file(database_url, settings.data_dir)
    if secret is None:
        _say(f"API key for `meter` commands and the demo: {path} (`meter keys list` shows the keys)")
        return
    _say("created an admin API key; it is shown this once (only its hash is stored):")
    _say(f"    {secret}")
    _say(f"it is also in {path} (mode 0600), which `meter` and the demo read")


def _unavailable(exc: Exception) -> bool:
    """JetStream cannot answer yet (no leader), as opposed to refusing the request."""
    if isinstance(exc, APIError):
        return exc.code == 503
    return isinstance(exc, (NatsTimeoutError, NoRespondersError))


def _stream_refused(exc: APIError) -> RuntimeError:
    """A clear message for a stream JetStream will not create or change (replicas it cannot place)."""
    replicas = load_stream_replicas()
    hint = (
        f" METER_STREAM_REPLICAS={replicas} needs a NATS cluster of at least {replicas} nodes"
        " (`meter up --nats-cluster 3`, or METER_NATS_URL listing a cluster's servers); 1 suits a single server."
        if replicas > 1
        else ""
    )
    return RuntimeError(f"JetStream refused the events stream {STREAM_NAME}: {exc.description}.{hint}")


def prepare_stream(nats_url: str, timeout: float = 90) -> None:
    """Create the stream and consumer when missing; changed METER_STREAM_MAX_* and
    METER_STREAM_REPLICAS take effect now.

    A cluster started again answers once its meta leader is elected, but the stream's own Raft group
    elects its leader a few seconds later (seen: a 5 s stream-info timeout): until then, try again.
    """

    async def prepare() -> None:
        nc = await jetstream.connect(nats_url, name="meter-up")
        deadline, said = time.monotonic() + timeout, False
        try:
            while True:
                try:
                    return await jetstream.ensure_stream_and_consumer(nc.jetstream(), apply_limits=True)
                except APIError as exc:
                    if not _unavailable(exc) or time.monotonic() > deadline:
                        raise _stream_refused(exc) from exc
                except Exception as exc:
                    if not _unavailable(exc) or time.monotonic() > deadline:
                        raise
                if not said:
                    said = True
                    _say("waiting for the events stream to elect its leader in the NATS cluster")
                await asyncio.sleep(1)
        finally:
            await nc.close()

    asyncio.run(prepare())


def _start_services(
    platform: Platform, settings: Settings, nats_url: str, database_url: str, dagster_db: str
) -> None:
    """The gateway, the Dagster webserver and daemon, with the environment that points them at the servers."""
    env = platform_env(
        nats_url,
        database_url,
        settings.data_dir.parent,
        METER_DAGSTER_DATABASE_URL=dagster_db,
        METER_MAX_CONCURRENT_RUNS=max_concurrent_runs(),
        METER_CATALOG_DIR=str(settings.catalog_dir.resolve()),
        DAGSTER_HOME=str(dagster_home()),
    )
    platform._spawn(
        "gateway",
        gateway_command(settings.gateway_host, settings.gateway_port),
        gateway_env(env, settings.data_dir),
        port=settings.gateway_port,
    )
    workspace = str(dagster_home().parent / "workspace.yaml")
    platform._spawn(
        "dagster-webserver",
        dagster_webserver_command(settings.gateway_host, settings.dagster_port, workspace),
        env,
    )
    platform._spawn("dagster-daemon", dagster_daemon_command(workspace), env)


def _announce(settings: Settings, nats_url: str, database_url: str) -> None:
    """Write .meter/runtime.json (for `meter` commands) and print where everything is."""
    gateway_url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    dagster_url = f"http://{settings.gateway_host}:{settings.dagster_port}"
    runtime = {"gateway_url": gateway_url, "dagster_url": dagster_url, "nats_url": nats_url,
               "database_url": database_url, "pid": os.getpid()}  # fmt: skip
    (settings.data_dir / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2))
    _say(f"gateway     {gateway_url}   (POST /v1/events, GET /v1/ingest/status)")
    _say(f"Dagster UI  {dagster_url}   (starting; the sensor keeps an ingestion run draining)")
    _say(f"NATS        {nats_url}")
    _say(f"PostgreSQL  {database_url}")
    _say(f"logs in {settings.data_dir / 'logs'}; try `meter demo --events 100000`; Ctrl-C stops everything")


def up(nats_cluster: int = 0) -> int:
    """Run the platform until Ctrl-C; with ``nats_cluster`` (3 or more), NATS as a cluster of that many."""
    settings = load_settings()
    if nats_cluster and settings.nats_url:
        raise SystemExit("--nats-cluster starts embedded NATS nodes: unset METER_NATS_URL, or drop the flag.")
    if nats_cluster and nats_cluster < 3:
        raise SystemExit("--nats-cluster needs at least 3 nodes (a majority must survive losing one).")
    catalog = load_catalog(settings.catalog_dir)
    validate_catalog_types(catalog)
    _check_ports(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    platform = Platform(settings)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # A shell without job control starts background jobs with SIGINT ignored; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if nats_cluster:
            nats_url = _embedded_nats_cluster(platform, settings, nats_cluster)
        else:
            nats_url = settings.nats_url or _embedded_nats(platform, settings)
        database_url = settings.database_url or _embedded_postgres(platform, settings)
        dagster_db = _prepare_database(database_url, catalog)
        _api_key(settings, database_url)
        prepare_stream(nats_url)
        _start_services(platform, settings, nats_url, database_url, dagster_db)
        _announce(settings, nats_url, database_url)
        platform.supervisor.run()
        return 0  # run() returns only through Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        _say("shutting down")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        platform.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def read_runtime(settings: Settings | None = None) -> dict[str, str]:
    """The URLs of the running ``meter up`` (empty when none is running)."""
    settings = settings or load_settings()
    path = settings.data_dir / RUNTIME_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())
