"""The runtime's building blocks against real sockets and processes."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

from meter_platform.runtime.servers import Server, free_port, port_is_free, spawn, wait_for_port
from meter_platform.runtime.supervisor import Supervisor


def _time_wait_on(port: int) -> None:
    """Leave a connection in TIME_WAIT on ``port`` (the server side closes first), listener closed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server closes first: its end of the connection goes to TIME_WAIT
    client.recv(1)  # the FIN arrived
    client.close()
    listener.close()


def test_a_port_with_only_time_wait_connections_left_is_free():
    port = free_port()
    _time_wait_on(port)
    assert port_is_free("127.0.0.1", port)


def test_a_port_someone_listens_on_is_taken():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not port_is_free("127.0.0.1", listener.getsockname()[1])


# --- the supervisor --------------------------------------------------------------------------------


def _http_server(port: int, log: Path, gate: Path | None = None) -> Server:
    """A tiny real HTTP server on ``port``; with ``gate``, it exits at once (code 3) unless the file exists."""
    script = (
        "import http.server, pathlib, sys\n"
        "gate = sys.argv[2]\n"
        "if gate and not pathlib.Path(gate).exists(): sys.exit(3)\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)"
        ".serve_forever()\n"
    )
    proc = spawn([sys.executable, "-c", script, str(port), str(gate or "")], log)
    if not gate or gate.exists():
        wait_for_port("127.0.0.1", port, proc, "http", log)
    return Server("http", proc, f"http://127.0.0.1:{port}", log)


def _poll_until(supervisor: Supervisor, condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        supervisor.poll()
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_killed_child_is_restarted_on_its_port_while_the_others_keep_serving(tmp_path):
    lines: list[str] = []
    supervisor = Supervisor(lines.append, first_delay=0.2)
    ports = {name: free_port() for name in ("a", "b")}
    try:
        for name, port in ports.items():
            supervisor.add(name, lambda port=port, name=name: _http_server(port, tmp_path / f"{name}.log"))
        victim, other = supervisor["a"], supervisor["b"]
        os.kill(victim.process.pid, signal.SIGKILL)
        _poll_until(supervisor, lambda: any("restarted" in line for line in lines))
        assert supervisor["a"].process.pid != victim.process.pid
        assert _answers(supervisor["a"].url) and supervisor["a"].url == victim.url  # the same port
        assert supervisor["b"] is other and _answers(other.url)  # never touched
        assert lines[0].startswith("a exited with code -9; restarting it in 0.2 s")
        assert lines[1].startswith(f"a restarted at {victim.url}")
    finally:
        supervisor.stop()


def test_restarts_back_off_doubling_and_start_over_once_the_child_stayed_up(tmp_path):
    lines: list[str] = []
    supervisor = Supervisor(lines.append, first_delay=0.1, max_delay=0.4, stable_after=1.0)
    gate, port = tmp_path / "gate", free_port()
    gate.touch()
    try:
        supervisor.add("flaky", lambda: _http_server(port, tmp_path / "flaky.log", gate))
        gate.unlink()  # from now on it dies as soon as it starts
        os.kill(supervisor["flaky"].process.pid, signal.SIGKILL)
        _poll_until(supervisor, lambda: sum("restarting it in" in line for line in lines) >= 5)
        delays = [line.split("restarting it in ")[1].split(" s")[0] for line in lines if "restarting" in line]
        assert delays[:5] == ["0.1", "0.2", "0.4", "0.4", "0.4"]
        assert "flaky exited with code 3" in lines[-1]
        gate.touch()  # it can start again: once it stayed up a while, the backoff starts over
        _poll_until(supervisor, lambda: _answers(supervisor["flaky"].url))
        time.sleep(1.1)
        lines.clear()
        os.kill(supervisor["flaky"].process.pid, signal.SIGKILL)
        _poll_until(supervisor, lambda: bool(lines))
        assert "restarting it in 0.1 s" in lines[0]
    finally:
        supervisor.stop()


def test_an_unhealthy_child_is_restarted(tmp_path):
    lines: list[str] = []
    verdicts = iter(["JetStream is disabled"])
    supervisor = Supervisor(lines.append, first_delay=0.1, check_every=0.1)
    port = free_port()
    try:
        first = supervisor.add(
            "sick", lambda: _http_server(port, tmp_path / "sick.log"), check=lambda s: next(verdicts, None)
        )
        _poll_until(supervisor, lambda: any("restarted" in line for line in lines))
        assert first.process.poll() is not None  # stopped before its replacement took the port
        assert lines[0].startswith("sick JetStream is disabled; restarting it in 0.1 s")
        assert _answers(supervisor["sick"].url)
    finally:
        supervisor.stop()


def test_the_embedded_nats_server_comes_back_on_its_port_with_its_data(tmp_path):
    """As `meter up` supervises it: killed -9, it is started again on the same port and file store."""
    import asyncio

    from meter_platform.capture import jetstream
    from meter_platform.config import STREAM_NAME
    from meter_platform.runtime.servers import start_nats

    async def publish_and_count(url: str, publish: bool) -> int:
        nc = await jetstream.connect(url, name="tests", max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await jetstream.ensure_stream_and_consumer(js)
            if publish:
                await js.publish("meter.events.api_call", b"{}")
            return (await js.stream_info(STREAM_NAME)).state.messages
        finally:
            await nc.close()

    lines: list[str] = []
    supervisor = Supervisor(lines.append)
    store = tmp_path / "nats"
    nats = start_nats(store)
    port = int(nats.url.rsplit(":", 1)[1])
    supervisor.add("nats", lambda: start_nats(store, port=port), server=nats)
    try:
        assert asyncio.run(publish_and_count(nats.url, True)) == 1
        os.kill(nats.process.pid, signal.SIGKILL)
        started = time.monotonic()
        _poll_until(
            supervisor, lambda: supervisor["nats"] is not nats and supervisor["nats"].process.poll() is None
        )
        assert time.monotonic() - started < 5
        assert supervisor["nats"].url == nats.url
        assert asyncio.run(publish_and_count(nats.url, True)) == 2  # the message from before is still there
        assert lines[0].startswith("nats exited with code -9; restarting it in 1 s")
        assert lines[1].startswith(f"nats restarted at {nats.url}")
    finally:
        supervisor.stop()
