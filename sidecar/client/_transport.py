"""HTTP/1.1 over the sidecar's Unix socket: one blocking transport, one for asyncio.

A transport sends one request and hands back the raw answer; it knows nothing of the API. Both
keep connections alive, write each request as one pre-encoded buffer, and read answers with
llhttp (through ``httptools``), the parser Node.js uses: no HTTP is parsed by hand here.

Bounds: ``timeout`` (seconds) bounds connecting and the whole of each answer; an answer larger
than ``MAX_ANSWER_BYTES`` is refused; ``AsyncUnixTransport`` opens at most ``max_connections``.
Every OS and parser failure becomes ``SidecarUnreachable`` (``connection_failure`` or
``_broken``), so callers see one error type whatever went wrong on the wire.

A kept-alive connection the sidecar closed while idle is noticed when the next request finds it
closed before any byte of an answer came back; that request is sent once more on a fresh
connection. Every call here may be sent twice that way: at worst a data key is issued twice and
one is dropped, each issuance audited.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple, cast

import httptools

from sidecar.client._errors import SidecarUnreachable, connection_failure

#: The largest answer body a client accepts (bytes); a batch of 1,000 data keys is ~150 KiB.
MAX_ANSWER_BYTES = 128 * 1024 * 1024
_RECV_BYTES = 64 * 1024
# The socket decides where a request goes; the host only fills the Host header.
_HOST = b"localhost"


class RawAnswer(NamedTuple):
    """An HTTP answer as it came: status, the ``Retry-After`` header, and the body bytes."""

    status: int
    retry_after: str | None
    body: bytes


def encode_head(headers: Mapping[str, str]) -> bytes:
    """The header lines every request of a client carries (``Host`` first), encoded once."""
    lines = [b"Host: " + _HOST]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"The header {name!r} holds a line break.")
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n"


def encode_request(method: str, path: str, body: bytes | None, head: bytes) -> bytes:
    """One request as bytes: request line, ``head``, ``Content-Length`` and ``body``."""
    payload = body or b""
    return b"".join(
        (
            f"{method} {path} HTTP/1.1\r\n".encode("ascii"),
            head,
            b"Content-Length: %d\r\n\r\n" % len(payload),
            payload,
        )
    )


class _Dropped(Exception):
    """The connection closed before any byte of the answer: the request may be sent again."""


class _Broken(Exception):
    """The answer was cut short, malformed or too large: the connection cannot be reused."""


class _AnswerReader:
    """llhttp callbacks collecting one answer at a time of one connection."""

    __slots__ = ("_parser", "_size", "keep_alive", "parts", "retry_after", "started", "status")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.retry_after: str | None = None
        self.parts: list[bytes] = []
        self.keep_alive = False
        self.started = False
        self._size = 0

    def feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; True once the whole answer is in. Raises ``_Broken``."""
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._size > MAX_ANSWER_BYTES:
                raise _Broken(f"an answer larger than {MAX_ANSWER_BYTES} bytes") from None
            raise _Broken(f"a malformed answer ({type(exc).__name__})") from None
        return self.status != 0

    def answer(self) -> RawAnswer:
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        return RawAnswer(self.status, self.retry_after, body)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            raise _Broken("too large")  # wrapped by httptools; ``feed`` names it
        self.parts.append(body)

    def on_message_complete(self) -> None:
        # Read here: llhttp resets both once it moves on to the next message.
        self.keep_alive = self._parser.should_keep_alive()
        self.status = self._parser.get_status_code()


def _broken(socket_path: str, reason: str) -> SidecarUnreachable:
    return SidecarUnreachable(
        f"The sidecar at {socket_path} broke off the answer ({reason}).", socket_path=socket_path
    )


class UnixTransport:
    """Blocking requests over one kept-alive connection, reopened when the sidecar drops it.

    ``headers`` go with every request. A lock serialises callers, so sharing one transport
    between threads is safe but not concurrent.
    """

    def __init__(self, socket_path: str, *, timeout: float, headers: Mapping[str, str]) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._head = encode_head(headers)
        self._sock: socket.socket | None = None
        self._reader = _AnswerReader()
        self._buffer = bytearray(_RECV_BYTES)
        self._lock = threading.Lock()
        self._closed = False

    def send(self, method: str, path: str, body: bytes | None) -> RawAnswer:
        request = encode_request(method, path, body, self._head)
        with self._lock:
            if self._closed:
                raise RuntimeError("The client is closed.")
            reused = self._sock is not None
            try:
                return self._exchange(request)
            except _Dropped:
                if not reused:
                    raise self._failure(ConnectionResetError()) from None
            try:
                return self._exchange(request)
            except _Dropped:
                raise self._failure(ConnectionResetError()) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()
            self._buffer[:] = bytes(len(self._buffer))  # it held the last answer's bytes

    def _exchange(self, request: bytes) -> RawAnswer:
        sock = self._sock if self._sock is not None else self._connect()
        reader = self._reader
        reader.reset()
        deadline = time.monotonic() + self.timeout
        try:
            sock.sendall(request)
            while True:
                received = sock.recv_into(self._buffer)
                if not received:
                    self._drop()
                    if reader.started:
                        raise _broken(self.socket_path, "closed mid-answer")
                    raise _Dropped
                if reader.feed(memoryview(self._buffer)[:received]):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
        except (BrokenPipeError, ConnectionResetError):
            self._drop()
            if reader.started:
                raise _broken(self.socket_path, "connection reset") from None
            raise _Dropped from None
        except OSError as exc:
            self._drop()
            raise self._failure(exc) from exc
        except _Broken as exc:
            self._drop()
            raise _broken(self.socket_path, str(exc)) from None
        if not reader.keep_alive:
            self._drop()
        elif sock.gettimeout() != self.timeout:
            sock.settimeout(self.timeout)
        return reader.answer()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise self._failure(exc) from exc
        self._sock = sock
        self._reader = _AnswerReader()
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _failure(self, error: OSError) -> SidecarUnreachable:
        return connection_failure(self.socket_path, error, timeout=self.timeout)


class _Connection(asyncio.Protocol):
    """One kept-alive connection of ``AsyncUnixTransport``: one request in flight at a time."""

    def __init__(self, owner: AsyncUnixTransport) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._reader = _AnswerReader()
        self._waiter: asyncio.Future[RawAnswer] | None = None
        self.open = False

    @property
    def reusable(self) -> bool:
        return self.open and self._reader.keep_alive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self.open = True

    def start(self, request: bytes, waiter: asyncio.Future[RawAnswer]) -> None:
        """Write ``request``; ``waiter`` gets the answer, or the reason there is none."""
        assert self._transport is not None
        self._reader.reset()
        self._waiter = waiter
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.abort()  # an answer nobody asked for: the stream can no longer be trusted
            return
        try:
            done = self._reader.feed(data)
        except _Broken as exc:
            self.fail(exc)
            return
        if done:
            self._waiter = None
            waiter.set_result(self._reader.answer())

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._transport = None
        self.fail(_Broken("closed mid-answer") if self._reader.started else _Dropped())
        self._owner._lost()

    def fail(self, error: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.abort()

    def abort(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()


class AsyncUnixTransport:
    """Requests over kept-alive connections, at most ``max_connections`` open at once.

    ``headers`` go with every request. Connections are made on first use and belong to that
    event loop; a request from another loop raises ``RuntimeError``. When all are busy, a
    request waits for one to be free (within its ``timeout``).
    """

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float,
        headers: Mapping[str, str],
        max_connections: int = 64,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_connections = max_connections
        self._head = encode_head(headers)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        #: Connections opening or open (a lost one is counted out by ``_lost``).
        self._count = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def send(self, method: str, path: str, body: bytes | None) -> RawAnswer:
        request = encode_request(method, path, body, self._head)
        if self._closed:
            raise RuntimeError("The client is closed.")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                raise RuntimeError("The client's connections belong to another event loop.")
            self._loop = loop
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except _Dropped:
                pass  # the sidecar closed it while idle: once more on a fresh connection
        connection = await self._connect()
        try:
            return await self._exchange(connection, request)
        except _Dropped:
            raise self._failure(ConnectionResetError()) from None

    async def aclose(self) -> None:
        self._closed = True
        for connection in (*self._idle, *self._busy):
            connection.close()
        self._idle.clear()
        self._busy.clear()
        await asyncio.sleep(0)  # lets the transports run connection_lost

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                return connection
        return None

    async def _exchange(self, connection: _Connection, request: bytes) -> RawAnswer:
        assert self._loop is not None
        waiter: asyncio.Future[RawAnswer] = self._loop.create_future()
        self._busy.add(connection)
        connection.start(request, waiter)
        timer = self._loop.call_later(self.timeout, connection.fail, _TimedOut())
        try:
            answer = await waiter
        except _TimedOut:
            raise self._failure(TimeoutError()) from None
        except _Broken as exc:
            raise _broken(self.socket_path, str(exc)) from None
        except BaseException:
            connection.abort()  # cancelled mid-answer (or dropped): what is left must not be read
            raise
        finally:
            timer.cancel()
            self._busy.discard(connection)
        if connection.reusable and not self._closed:
            self._idle.append(connection)
            if self._waiting:
                self._wake_one()
        else:
            connection.close()
        return answer

    async def _connect(self) -> _Connection:
        assert self._loop is not None
        deadline = self._loop.time() + self.timeout
        while self._count >= self.max_connections:
            # Every connection is busy: wait for one to come back (or be lost), then take it.
            ready: asyncio.Future[None] = self._loop.create_future()
            self._waiting.append(ready)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - self._loop.time()))
            except (TimeoutError, asyncio.TimeoutError):
                raise self._failure(TimeoutError()) from None
            finally:
                if not ready.done():
                    ready.cancel()
            if self._closed:
                raise RuntimeError("The client is closed.")
            idle = self._take_idle()
            if idle is not None:
                return idle
        self._count += 1
        try:
            _, connection = await asyncio.wait_for(
                self._loop.create_unix_connection(lambda: _Connection(self), self.socket_path),
                max(0.0, deadline - self._loop.time()),
            )
        except (TimeoutError, asyncio.TimeoutError):
            self._lost()
            raise self._failure(TimeoutError()) from None
        except OSError as exc:
            self._lost()
            raise self._failure(exc) from exc
        except BaseException:
            self._lost()
            raise
        return connection

    def _lost(self) -> None:
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            ready = self._waiting.popleft()
            if not ready.done():
                ready.set_result(None)
                return

    def _failure(self, error: OSError) -> SidecarUnreachable:
        return connection_failure(self.socket_path, error, timeout=self.timeout)


class _TimedOut(Exception):
    """No whole answer within the timeout (set on the waiter by the request's timer)."""
