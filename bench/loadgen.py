"""A lean keep-alive HTTP/1.1 load generator on raw asyncio Protocols (uvloop when installed).

The aiohttp client tops out near 3k req/s on one core, which would hide the difference between
the servers being compared. This generator keeps ``connections`` persistent connections (Unix
socket or TCP), each with exactly one request in flight: it writes pre-built request bytes,
parses just the status line, ``Content-Length`` (or a chunked body) and the body, records the
latency with :func:`time.perf_counter_ns`, and sends the next request at once.

Every response is checked: its status is counted, and an optional ``check`` on the body counts
bad bodies. :attr:`Result.errors` is everything that was not a good 200; a caller must report it.

Also here: :func:`fetch` for one-off blocking requests (health checks, status reads), and
:func:`serve_canned`, a trivial server that answers every request with fixed bytes, used to
measure the generator's own ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

#: A check on a response body: True when it is what the benchmark expects.
BodyCheck = Callable[[bytes], bool]


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a Unix socket path, or a TCP host and port."""

    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def describe(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"tcp:{self.host}:{self.port}"

    def connect_blocking(self, timeout: float) -> socket.socket:
        """A connected blocking socket; raises ``OSError`` when nothing listens."""
        if self.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = self.unix_path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (self.host, self.port)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock


def build_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    keep_alive: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request with ``Content-Length`` (always sent, even when 0)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: localhost",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    if body:
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The server's response is not HTTP/1.1 this parser understands."""


def parse_response(buf: bytes) -> tuple[int, bytes, int] | None:
    """``(status, body, bytes consumed)`` of the first complete response in ``buf``, or None.

    Understands ``Content-Length`` and ``Transfer-Encoding: chunked``; a response with neither
    has an empty body (keep-alive servers always send one of the two for bodies).
    Raises :class:`ProtocolError` for anything else.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    if buf[:5] != b"HTTP/":
        raise ProtocolError(f"not an HTTP response: {buf[:40]!r}")
    try:
        status = int(buf[9:12])
    except ValueError:
        raise ProtocolError(f"bad status line: {buf[:40]!r}") from None
    start = end + 4
    # Both servers measured here spell it this way; the lower-casing path is for the others.
    at = buf.find(b"\r\nContent-Length:", 0, end)
    head = b""
    if at < 0:
        head = buf[:end].lower()
        at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = start + int(buf[at + 17 : buf.find(b"\r\n", at + 17)])
        if len(buf) < stop:
            return None
        return status, buf[start:stop], stop
    if b"\r\ntransfer-encoding: chunked" in head:
        return _parse_chunked(buf, status, start)
    return status, b"", start


def _parse_chunked(buf: bytes, status: int, pos: int) -> tuple[int, bytes, int] | None:
    chunks: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return status, b"".join(chunks), trailer_end + 4
        if len(buf) < pos + size + 2:
            return None
        chunks.append(buf[pos : pos + size])
        pos += size + 2


def fetch(
    endpoint: Endpoint,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One blocking request on a fresh connection: ``(status, body)``.

    Raises ``OSError`` when the server cannot be reached (or answers nothing within ``timeout``
    seconds) and :class:`ProtocolError` for a malformed answer.
    """
    with endpoint.connect_blocking(timeout) as sock:
        sock.sendall(build_request(method, path, body, headers, keep_alive=False))
        buf = b""
        while True:
            parsed = parse_response(buf)
            if parsed is not None:
                return parsed[0], parsed[1]
            data = sock.recv(65536)
            if not data:
                raise ProtocolError(f"connection closed mid-response after {len(buf)} bytes")
            buf += data


@dataclass
class Result:
    """What one load run measured. Times in seconds unless the name says otherwise."""

    connections: int
    #: Length of the measured window (warm-up excluded).
    seconds: float
    #: Responses completed inside the window, good or bad.
    completed: int
    statuses: dict[int, int]
    #: 200 responses whose body failed the run's check.
    bad_bodies: int
    #: Connections the server closed or reset, and connections that could not be opened.
    connection_errors: int
    #: Requests still unanswered when the run gave up waiting for them.
    unanswered: int
    #: Generator process CPU time spent inside the window (user + system).
    generator_cpu_seconds: float
    #: Every latency in the window, sorted ascending (nanoseconds).
    latencies_ns: list[int] = field(repr=False)
    first_error: str | None = None

    @property
    def requests_per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        """Everything that was not a good 200."""
        non_200 = sum(n for status, n in self.statuses.items() if status != 200)
        return non_200 + self.bad_bodies + self.connection_errors + self.unanswered

    def percentile_ms(self, q: float) -> float:
        """Latency at quantile ``q`` (0 to 1, nearest rank) in milliseconds; NaN if none."""
        if not self.latencies_ns:
            return math.nan
        rank = max(1, math.ceil(q * len(self.latencies_ns)))
        return self.latencies_ns[rank - 1] / 1e6

    @property
    def generator_cpu_fraction(self) -> float:
        """Generator CPU time over wall time in the window: near 1.0 means generator-bound."""
        return self.generator_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, object]:
        """The figures as plain JSON-able values (latencies in ms, rates per second)."""
        return {
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
            "completed": self.completed,
            "requests_per_second": round(self.requests_per_second, 1),
            "p50_ms": round(self.percentile_ms(0.50), 4),
            "p99_ms": round(self.percentile_ms(0.99), 4),
            "max_ms": round(self.percentile_ms(1.0), 4),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "bad_bodies": self.bad_bodies,
            "connection_errors": self.connection_errors,
            "unanswered": self.unanswered,
            "errors": self.errors,
            "first_error": self.first_error,
            "generator_cpu_fraction": round(self.generator_cpu_fraction, 3),
        }


class _Run:
    """State shared by the connections of one run."""

    def __init__(self, request: bytes, check: BodyCheck | None, budget: int | None) -> None:
        self.request = request
        self.check = check
        #: Requests still allowed to be sent (None: until ``stopping``).
        self.budget = budget
        self.recording = False
        self.stopping = False
        self.in_flight = 0
        self.completed = 0
        self.statuses: dict[int, int] = {}
        self.bad_bodies = 0
        self.connection_errors = 0
        self.first_error: str | None = None
        self.latencies: list[int] = []
        self.idle = asyncio.Event()

    def note_error(self, message: str) -> None:
        if self.first_error is None:
            self.first_error = message

    def may_send(self) -> bool:
        if self.stopping:
            return False
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


class _Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._sent_at = 0
        self._waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        run = self._run
        if self._transport is None or not run.may_send():
            self._maybe_idle()
            return
        self._waiting = True
        run.in_flight += 1
        self._sent_at = time.perf_counter_ns()
        self._transport.write(run.request)

    def _maybe_idle(self) -> None:
        if self._run.in_flight == 0 and (self._run.stopping or self._run.budget == 0):
            self._run.idle.set()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self._buf + data if self._buf else data
        run = self._run
        try:
            parsed = parse_response(buf)
        except (ProtocolError, ValueError) as exc:
            run.note_error(f"unparseable response: {exc}")
            run.connection_errors += 1
            assert self._transport is not None
            self._transport.abort()
            return
        if parsed is None:
            self._buf = buf
            return
        status, body, consumed = parsed
        self._buf = buf[consumed:]
        if not self._waiting:
            run.note_error("response without a request")
            return
        self._waiting = False
        run.in_flight -= 1
        if run.recording:
            run.completed += 1
            run.latencies.append(now - self._sent_at)
            run.statuses[status] = run.statuses.get(status, 0) + 1
            if status != 200:
                run.note_error(f"HTTP {status}: {body[:300]!r}")
            elif run.check is not None and not run.check(body):
                run.bad_bodies += 1
                run.note_error(f"unexpected body: {body[:300]!r}")
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        run = self._run
        self._transport = None
        if self._waiting:
            self._waiting = False
            run.in_flight -= 1
            run.connection_errors += 1
            run.note_error(f"connection lost mid-request: {exc or 'closed by the server'}")
        self._maybe_idle()


async def _open(endpoint: Endpoint, run: _Run) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    if endpoint.unix_path:
        transport, _ = await loop.create_unix_connection(
            lambda: _Connection(run), endpoint.unix_path
        )
    else:
        transport, _ = await loop.create_connection(
            lambda: _Connection(run), endpoint.host, endpoint.port
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    endpoint: Endpoint,
    request: bytes,
    *,
    connections: int,
    duration: float | None = None,
    requests: int | None = None,
    warmup: float = 0.5,
    check: BodyCheck | None = None,
    drain_timeout: float = 10.0,
) -> Result:
    """Send ``request`` over ``connections`` keep-alive connections and measure the answers.

    Runs for ``duration`` seconds after ``warmup`` seconds whose answers are not counted, or,
    with ``requests``, until that many requests have been answered (no warm-up then).
    Requests still unanswered ``drain_timeout`` seconds after the end count as ``unanswered``.
    """
    if (duration is None) == (requests is None):
        raise ValueError("pass exactly one of duration and requests")
    run = _Run(request, check, requests)
    transports: list[asyncio.Transport] = []
    opened = await asyncio.gather(
        *(_open(endpoint, run) for _ in range(connections)), return_exceptions=True
    )
    for item in opened:
        if isinstance(item, BaseException):
            run.connection_errors += 1
            run.note_error(f"cannot connect to {endpoint.describe()}: {item}")
        else:
            transports.append(item)
    try:
        if duration is not None and warmup > 0:
            await asyncio.sleep(warmup)
        run.recording = True
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        if duration is not None:
            await asyncio.sleep(duration)
            run.stopping = True
        else:
            while run.in_flight or run.budget:
                if not transports or all(t.is_closing() for t in transports):
                    break
                run.idle.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.idle.wait(), 1.0)
        t1, cpu1 = time.perf_counter(), _cpu_seconds()
        run.recording = False
        run.stopping = True
        deadline = time.monotonic() + drain_timeout
        while run.in_flight and time.monotonic() < deadline:
            run.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.idle.wait(), max(0.01, deadline - time.monotonic()))
    finally:
        for transport in transports:
            transport.close()
    unanswered = run.in_flight if requests is None else run.in_flight + (run.budget or 0)
    if unanswered:
        run.note_error(f"{unanswered} requests unanswered after {drain_timeout}s")
    return Result(
        connections=connections,
        seconds=t1 - t0,
        completed=run.completed,
        statuses=run.statuses,
        bad_bodies=run.bad_bodies,
        connection_errors=run.connection_errors,
        unanswered=unanswered,
        generator_cpu_seconds=cpu1 - cpu0,
        latencies_ns=sorted(run.latencies),
        first_error=run.first_error,
    )


# -- a trivial server, to measure the generator itself -----------------------------------

CANNED_BODY = b'{"ok":true}'
CANNED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(CANNED_BODY)).encode()
    + b"\r\n\r\n"
    + CANNED_BODY
)


class _Canned(asyncio.Protocol):
    """Answers each bodiless request (one per ``\\r\\n\\r\\n``) with :data:`CANNED_RESPONSE`."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._tail + data
        count = buf.count(b"\r\n\r\n")
        self._tail = buf[buf.rfind(b"\r\n\r\n") + 4 :] if count else buf
        if count and self._transport is not None:
            self._transport.write(CANNED_RESPONSE * count)


async def serve_canned(unix_path: str) -> None:
    """Serve :data:`CANNED_RESPONSE` on ``unix_path`` until cancelled (send bodiless requests)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(_Canned, unix_path, backlog=1024)
    async with server:
        await server.serve_forever()
