"""The load generator's HTTP clients: a minimal keep-alive client (the default), or httpx."""

from __future__ import annotations

import asyncio
import time

import httpx

_JSON = {"content-type": "application/json"}


def count_error(errors: dict[str, int], key: str) -> None:
    errors[key] = errors.get(key, 0) + 1


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load generator's client.

    httpx's connection pool spends most of a core on bookkeeping with 64 connections (its pool scan is
    O(connections) per request): as a load generator it would measure itself, not the gateway. This
    client writes one request and reads one response with a Content-Length, nothing more.
    """

    #: uvicorn closes a keep-alive connection idle for 5 s; reopen before that rather than race it.
    MAX_IDLE = 2.0

    def __init__(self, url: str, api_key: str = ""):
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.hostport = url.split("://", 1)[1].rstrip("/")
        self.host = self.hostport
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    @classmethod
    async def open(cls, url: str, api_key: str = "") -> RawConnection:
        conn = cls(url, api_key)
        await conn._connect()
        return conn

    async def _connect(self) -> None:
        if self.writer is not None:
            self.writer.close()
        host, port = self.hostport.rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.last_used = time.monotonic()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request, return (status, body)."""
        if time.monotonic() - self.last_used > self.MAX_IDLE:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{self.auth}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.writer.write(body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        else:
            raise RuntimeError(f"response without Content-Length: {raw[:200]!r}")
        data = await self.reader.readexactly(length) if length else b""
        self.last_used = time.monotonic()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LoadClient:
    """``concurrency`` connections to the gateway, one per worker (raw, or httpx with ``--client httpx``)."""

    def __init__(self, url: str, concurrency: int, kind: str, api_key: str = ""):
        self.url, self.concurrency, self.kind, self.api_key = url, concurrency, kind, api_key
        self.raw: list[RawConnection] = []
        self.httpx: httpx.AsyncClient | None = None

    async def __aenter__(self) -> LoadClient:
        if self.kind == "httpx":
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            self.httpx = httpx.AsyncClient(
                base_url=self.url, limits=limits, timeout=httpx.Timeout(60.0), headers=headers
            )
            await asyncio.gather(*(self.httpx.get("/healthz") for _ in range(self.concurrency)))
        else:
            self.raw = list(
                await asyncio.gather(
                    *(RawConnection.open(self.url, self.api_key) for _ in range(self.concurrency))
                )
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.raw:
            conn.close()
        if self.httpx is not None:
            await self.httpx.aclose()

    async def post(self, worker: int, body: bytes) -> int:
        """POST /v1/events on the worker's connection; the status code."""
        if self.httpx is not None:
            return (await self.httpx.post("/v1/events", content=body, headers=_JSON)).status_code
        return (await self.raw[worker].request("POST", "/v1/events", body))[0]
