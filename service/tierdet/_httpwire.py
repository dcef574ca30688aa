"""Minimal HTTP/1.1 for tierdet.client, on the standard library only.

The client must not pull web-client packages into every install of
tierdet (the serving path's dependencies are fixed), so: ``http.client``
with one kept-alive connection for the sync client, and a small asyncio
implementation (one connection per request, bounded in time and size)
for the async one.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

# A rendered PNG of the largest image the server accepts stays below this.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class WireError(Exception):
    """The server could not be reached or answered something that is not HTTP."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix, without a trailing slash

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port in (80, 443) else f"{host}:{self.port}"


class SyncWire:
    """One kept-alive connection; not thread-safe (one client per thread)."""

    def __init__(self, endpoint: Endpoint, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        e = self.endpoint
        if e.scheme == "https":
            return http.client.HTTPSConnection(e.host, e.port, timeout=self.timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(e.host, e.port, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        for attempt in range(2):
            reused = self._conn is not None
            conn = self._conn or self._connect()
            try:
                conn.request(method, self.endpoint.prefix + path, body=body,
                             headers=headers or {})
                resp = conn.getresponse()
                data = resp.read(MAX_RESPONSE_BYTES + 1)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                # The server closed an idle kept-alive connection under us:
                # detection has no side effects, so send once more on a new one.
                if reused and attempt == 0:
                    continue
                raise WireError(f"connection to {self.endpoint.authority} lost: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise WireError(f"cannot reach {self.endpoint.authority}: {exc}") from exc
            if len(data) > MAX_RESPONSE_BYTES:
                self.close()
                raise WireError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
            if resp.will_close:
                self.close()
            else:
                self._conn = conn
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class AsyncWire:
    """HTTP/1.1 over asyncio streams, a connection per request (``Connection: close``):
    no pool to guard, and on loopback or a LAN the handshake costs little."""

    def __init__(self, endpoint: Endpoint, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        try:
            return await asyncio.wait_for(self._exchange(method, path, body or b"",
                                                         headers or {}), self.timeout_s)
        except asyncio.TimeoutError:
            raise WireError(f"no answer from {self.endpoint.authority} "
                            f"within {self.timeout_s:g} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            raise WireError(f"cannot talk to {self.endpoint.authority}: {exc}") from exc

    async def _exchange(self, method: str, path: str, body: bytes,
                        headers: dict[str, str]) -> Reply:
        e = self.endpoint
        reader, writer = await asyncio.open_connection(
            e.host, e.port, ssl=ssl.create_default_context() if e.scheme == "https" else None)
        try:
            lines = [f"{method} {e.prefix + path} HTTP/1.1", f"Host: {e.authority}",
                     "Connection: close", f"Content-Length: {len(body)}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            return await _read_reply(reader)
        finally:
            writer.close()


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    status = int(rest.split(" ", 1)[0])
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_RESPONSE_BYTES:
            raise ValueError(f"response of {length} bytes is over the limit")
        body = await reader.readexactly(length)
    else:  # delimited by the server closing the connection
        body = await reader.read(MAX_RESPONSE_BYTES + 1)
        if len(body) > MAX_RESPONSE_BYTES:
            raise ValueError("response over the size limit")
    return Reply(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        length = int(line.split(b";", 1)[0].strip(), 16)
        if length == 0:  # trailers, if any, go unread: the connection closes anyway
            break
        size += length
        if size > MAX_RESPONSE_BYTES:
            raise ValueError("response over the size limit")
        parts.append(await reader.readexactly(length))
        await reader.readexactly(2)  # the chunk's CRLF
    return b"".join(parts)
