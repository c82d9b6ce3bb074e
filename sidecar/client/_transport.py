"""HTTP/1.1 over the sidecar's Unix socket: one asynchronous transport (aiohttp), one blocking.

A transport sends one request and hands back the raw answer; it knows nothing of the API. Each
translates its library's connection errors into ``SidecarUnreachable`` in exactly one place.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from yarl import URL

from sidecar.client._errors import SidecarUnreachable, connection_failure

# The socket decides where a request goes; the host only fills the Host header.
_BASE_URL = "http://localhost"


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An HTTP answer as it came: status, the ``Retry-After`` header, and the body bytes."""

    status: int
    retry_after: str | None
    body: bytes


class AsyncUnixTransport:
    """Requests over one aiohttp session; ``timeout`` (seconds) bounds each whole request.

    The session is made on first use and is bound to that event loop.
    """

    def __init__(self, socket_path: str, *, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def send(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> RawAnswer:
        session = self._open_session()
        with self._map_errors():
            async with session.request(
                method, URL(_BASE_URL + path, encoded=True), data=body, headers=dict(headers)
            ) as response:
                raw = await response.read()
        return RawAnswer(response.status, response.headers.get("Retry-After"), raw)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("The client is closed.")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    @contextmanager
    def _map_errors(self) -> Iterator[None]:
        try:
            yield
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise connection_failure(
                self.socket_path, TimeoutError(), timeout=self.timeout
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise connection_failure(self.socket_path, exc.os_error, timeout=self.timeout) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise connection_failure(
                self.socket_path, ConnectionResetError(), timeout=self.timeout
            ) from exc
        except aiohttp.ClientOSError as exc:
            raise connection_failure(self.socket_path, exc, timeout=self.timeout) from exc
        except aiohttp.ClientError as exc:
            raise SidecarUnreachable(
                f"The sidecar at {self.socket_path} broke off the answer ({type(exc).__name__}).",
                socket_path=self.socket_path,
            ) from exc


class UnixTransport:
    """Blocking requests over one kept-alive connection, reopened when the sidecar drops it.

    ``timeout`` (seconds) bounds connecting and each read. A lock serialises callers, so sharing
    one transport between threads is safe but not concurrent.
    """

    def __init__(self, socket_path: str, *, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._connection = _UnixHTTPConnection(socket_path, timeout)
        self._lock = threading.Lock()
        self._closed = False

    def send(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> RawAnswer:
        with self._lock:
            if self._closed:
                raise RuntimeError("The client is closed.")
            reused = self._connection.sock is not None
            try:
                return self._exchange(method, path, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise self._failure(ConnectionResetError()) from None
                # The sidecar closed an idle kept-alive connection; every call here is safe
                # to send again (at worst a data key is issued twice and one is dropped).
            try:
                return self._exchange(method, path, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                raise self._failure(ConnectionResetError()) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._connection.close()

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> RawAnswer:
        connection = self._connection
        try:
            connection.request(method, path, body=body, headers=dict(headers))
            response = connection.getresponse()
            raw = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            raise
        except OSError as exc:
            connection.close()
            raise self._failure(exc) from exc
        except http.client.HTTPException as exc:
            connection.close()
            raise SidecarUnreachable(
                f"The sidecar at {self.socket_path} broke off the answer ({type(exc).__name__}).",
                socket_path=self.socket_path,
            ) from exc
        return RawAnswer(response.status, response.getheader("Retry-After"), raw)

    def _failure(self, error: OSError) -> SidecarUnreachable:
        return connection_failure(self.socket_path, error, timeout=self.timeout)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` speaking over an ``AF_UNIX`` stream socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
