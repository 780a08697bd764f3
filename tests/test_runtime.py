"""The runtime's building blocks against real sockets and processes."""

from __future__ import annotations

import socket

from meter_platform.runtime.servers import free_port, port_is_free


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
