"""Bounded connections: caps on open connections, deadlines on every read, and half-closes.

Each accepted connection is served by a :class:`BoundedRequestHandler` (aiohttp's handler,
extended) and counted in one :class:`ConnectionBounds`:

- **Caps.** At most ``max_connections`` open, and ``max_connections_per_uid`` per Unix peer uid
  (all TCP callers share one bucket). A connection over a cap first makes room by closing the
  longest-idle connection (of the same uid, or of the uid holding most connections), as nginx
  reuses idle keep-alive connections; only when none is idle is the newcomer closed.
- **Deadlines.** A connection that has sent nothing is closed after ``idle_timeout``, and so is
  a keep-alive connection between requests (aiohttp's ``keepalive_timeout``). Once the first
  byte of a request arrives its headers must be complete within ``header_timeout`` (slowloris),
  and its body within ``body_timeout`` of the headers. On the mTLS listener the TLS handshake
  must also finish within ``header_timeout`` (before it, the connection is not yet counted).
- **Half-close.** A caller that sends a complete request and then shuts down its write side
  (``SHUT_WR``) still gets its answer; the connection closes after it.
- **Malformed HTTP** (a bad request line, an unknown method, headers too long) is answered with
  Vault's JSON error body and logged in one line, without a traceback.

Every limit that bites is counted (``kms_connection_limits_total{limit}``) and logged at WARNING,
at most once per :data:`LOG_INTERVAL` seconds per limit with the count since the last line.

aiohttp's handler keeps its state in attributes this module reads: ``_request_count`` (requests
parsed on the connection) and ``_messages`` (parsed, not yet handled, with their bodies).
``tests/security/test_connections.py`` pins the behaviour that depends on them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.config import ServerConfig, tcp_host_port
from sidecar.errors import InvalidRequest, PayloadTooLarge, SidecarError
from sidecar.server.errors import error_response
from sidecar.server.pipeline import new_request_id

log = logging.getLogger(__name__)

#: Seconds between two log lines about the same limit.
LOG_INTERVAL = 10.0
#: File descriptors kept free of connections for the upstream, the audit log and the HSM.
RESERVED_FDS = 64
_UCRED = struct.Struct("3i")
#: The bucket of callers without peer credentials (the mTLS listener).
TCP = -1
LIMITS = (
    "max_connections",
    "max_connections_per_uid",
    "idle_timeout",
    "header_timeout",
    "body_timeout",
)


IdleQueue = OrderedDict["BoundedRequestHandler", None]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The bounds from ``[server]``; seconds and counts."""

    idle_timeout: float
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_connections_per_uid: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> ConnectionLimits:
        """The limits of ``server``; ``max_connections`` is lowered to fit ``RLIMIT_NOFILE``.

        A cap above the file-descriptor limit would let connections exhaust descriptors
        before the cap bites, and then every new caller and the upstream would fail.
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = server.max_connections
        if soft != resource.RLIM_INFINITY and cap > soft - RESERVED_FDS:
            fitted = max(1, soft - RESERVED_FDS)
            log.warning(
                "server.max_connections %d does not fit the open-file limit %d; using %d "
                "(raise LimitNOFILE to allow more)",
                cap,
                soft,
                fitted,
            )
            cap = fitted
        return cls(
            idle_timeout=server.idle_timeout,
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            max_connections=cap,
            max_connections_per_uid=min(server.max_connections_per_uid, cap),
        )


class ConnectionBounds:
    """Every open connection, by uid and by how long it has been idle; counts what bit."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._by_uid: dict[int, set[BoundedRequestHandler]] = {}
        #: Idle connections, longest idle first, per uid with open connections. Each handler
        #: holds its uid's queue and marks itself idle or busy there, per request.
        self._idle: dict[int, IdleQueue] = {}
        self.open = 0
        #: limit → times it bit
        self.limited: dict[str, int] = dict.fromkeys(LIMITS, 0)
        self._unlogged: dict[str, int] = dict.fromkeys(LIMITS, 0)
        self._logged_at: dict[str, float] = dict.fromkeys(LIMITS, -LOG_INTERVAL)

    # -- caps --------------------------------------------------------------------------------

    def admit(self, handler: BoundedRequestHandler) -> bool:
        """Count ``handler`` in; make room by closing an idle connection if a cap is reached."""
        uid, limits = handler.uid, self.limits
        if len(self._by_uid.get(uid, ())) >= limits.max_connections_per_uid and not self._evict(
            uid, "max_connections_per_uid"
        ):
            self.bit("max_connections_per_uid", uid)
            return False
        if self.open >= limits.max_connections and not self._evict(
            self._fullest_idle_uid(), "max_connections"
        ):
            self.bit("max_connections", uid)
            return False
        self._by_uid.setdefault(uid, set()).add(handler)
        handler.idle_queue = self._idle.setdefault(uid, OrderedDict())
        self.open += 1
        return True

    def release(self, handler: BoundedRequestHandler) -> None:
        uid = handler.uid
        mine = self._by_uid.get(uid)
        if mine is None or handler not in mine:
            return
        mine.discard(handler)
        handler.idle_queue.pop(handler, None)
        if not mine:
            del self._by_uid[uid], self._idle[uid]
        self.open -= 1

    def _fullest_idle_uid(self) -> int | None:
        """The uid with the most open connections among those with an idle one."""
        idle_uids = (uid for uid, idle in self._idle.items() if idle)
        return max(idle_uids, key=lambda uid: len(self._by_uid[uid]), default=None)

    def _evict(self, uid: int | None, limit: str) -> bool:
        """Close the longest-idle connection of ``uid`` to make room; False if it has none."""
        idle = self._idle.get(uid) if uid is not None else None
        if not idle:
            return False
        oldest = next(iter(idle))
        self.bit(limit, oldest.uid)
        oldest.close_now()
        return True

    # -- reporting ---------------------------------------------------------------------------

    def bit(self, limit: str, uid: int) -> None:
        """Count and (rate-limited) log one bite of ``limit`` on a connection of ``uid``."""
        self.limited[limit] += 1
        self._unlogged[limit] += 1
        now = time.monotonic()
        if now - self._logged_at[limit] < LOG_INTERVAL:
            return
        count, self._unlogged[limit] = self._unlogged[limit], 0
        self._logged_at[limit] = now
        who = "a TCP caller" if uid == TCP else f"uid {uid}"
        log.warning(
            "connection limit %s (%s) closed %d connection%s; the latest from %s "
            "(%d open, %d of them idle)",
            limit,
            self._describe(limit),
            count,
            "" if count == 1 else "s",
            who,
            self.open,
            sum(len(idle) for idle in self._idle.values()),
        )

    def _describe(self, limit: str) -> str:
        value = getattr(self.limits, limit)
        return f"{value:g}s" if limit.endswith("timeout") else str(value)

    def collector(self) -> Collector:
        """Prometheus families: connections open, and limits that bit."""
        return _BoundsCollector(self)


class _BoundsCollector(Collector):
    def __init__(self, bounds: ConnectionBounds) -> None:
        self._bounds = bounds

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        bounds = self._bounds
        open_ = GaugeMetricFamily("kms_connections_open", "Connections open on the listeners.")
        open_.add_metric([], bounds.open)
        yield open_
        limited = CounterMetricFamily(
            "kms_connection_limits",
            "Connections closed or refused because a limit bit, by limit.",
            labels=["limit"],
        )
        for limit, count in bounds.limited.items():
            limited.add_metric([limit], count)
        yield limited


def _peer_uid(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    if getattr(sock, "family", None) != socket.AF_UNIX:
        return TCP
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return TCP
    return int(_UCRED.unpack(raw)[1])


class BoundedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with the caps, deadlines and half-close of the module."""

    def __init__(self, manager: web.Server, *, bounds: ConnectionBounds, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.bounds = bounds
        self.uid = TCP
        #: Its uid's idle connections, set when admitted (see :class:`ConnectionBounds`).
        self.idle_queue: IdleQueue = OrderedDict()
        self._admitted = False
        #: The pending read deadline: which limit, and when (loop time; ``inf``: none).
        self._limit = "idle_timeout"
        self._deadline_at = math.inf
        #: One timer per connection, moved only when a deadline comes earlier than it.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        #: The body of the request being received, until it is complete.
        self._body: StreamReader | None = None
        #: Whether bytes of a request whose headers are not complete have arrived.
        self._in_headers = False
        #: Requests parsed and not yet answered.
        self._unanswered = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.uid = _peer_uid(transport)
        if not self.bounds.admit(self):
            cast(asyncio.Transport, transport).abort()  # refused: nothing read, nothing owed
            return
        self._admitted = True
        super().connection_made(transport)
        self._waiting("idle_timeout")

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.bounds.release(self)
        super().connection_lost(exc)

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if not self._admitted or not data:
            return
        limits = self.bounds.limits
        if self._request_count > parsed and self._messages:  # a request's headers are in
            self._unanswered += self._request_count - parsed
            self._in_headers = False
            self.idle_queue.pop(self, None)  # busy
            body = self._messages[-1][1]
            self._body = None if body.is_eof() else body
            if self._body is None:
                self._cancel_deadline()  # handling the request has no read deadline
            else:
                self._start_deadline("body_timeout", limits.body_timeout)
        elif self._body is not None:
            if self._body.is_eof():
                self._body = None
                self._cancel_deadline()
        elif not self._in_headers:  # the first byte of a request: its headers are now due
            self._in_headers = True
            self.idle_queue.pop(self, None)  # busy
            self._start_deadline("header_timeout", limits.header_timeout)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's contract: keep open
        """The caller shut down its write side: answer what it sent in full, then close."""
        if self._in_headers or self._body is not None:
            return False  # cut off mid-request: nothing to answer (aiohttp closes)
        if self._unanswered:
            self.close()  # answer what was sent, then close instead of keeping alive
            return True
        return False

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        """A request was answered. (No access log: :class:`BoundedSite` serves without one.)"""
        self._unanswered = max(0, self._unanswered - 1)
        if self._admitted and not self._unanswered and self._body is None:
            self._waiting("idle_timeout")

    # -- malformed HTTP ----------------------------------------------------------------------

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        # The caller's bytes were not HTTP: say so in Vault's shape; no traceback (no bug).
        log.info("malformed HTTP from %s: %s", _who(self.uid), type(exc).__name__)
        error: InvalidRequest = (
            PayloadTooLarge("The request line or headers are too large.")
            if status == 413
            else InvalidRequest("The request is not valid HTTP/1.1 that this server accepts.")
        )
        return closing_error_response(error)

    # -- deadlines ---------------------------------------------------------------------------

    def _waiting(self, limit: str) -> None:
        """Nothing of a request has arrived: idle (evictable) until ``idle_timeout``."""
        self._in_headers = False
        self.idle_queue[self] = None  # idle: evictable, after those idle longer
        self._start_deadline(limit, self.bounds.limits.idle_timeout)

    def _start_deadline(self, limit: str, seconds: float) -> None:
        """Close the connection ``seconds`` from now unless the deadline is cancelled or moved.

        Requests move deadlines many times a second, so moving one only writes two attributes;
        the timer is rescheduled when it fires early or a new deadline is earlier than it.
        """
        at = self._loop.time() + seconds
        self._limit, self._deadline_at = limit, at
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._set_timer(at)

    def _cancel_deadline(self) -> None:
        self._deadline_at = math.inf  # the timer, when it fires, finds nothing due

    def _set_timer(self, at: float) -> None:
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer, self._timer_at = None, math.inf
        at = self._deadline_at
        if at == math.inf:
            return
        if self._loop.time() < at:  # the deadline moved on since the timer was set
            self._set_timer(at)
            return
        self._deadline_at = math.inf
        self._expired(self._limit)

    def _expired(self, limit: str) -> None:
        if limit == "idle_timeout" and self._unanswered:
            return  # a request is being handled; the deadline starts again after it
        self.bounds.bit(limit, self.uid)
        self.close_now()

    def close_now(self) -> None:
        """Close the connection at once (a deadline passed, or room is needed); it stops
        counting against the caps now, not when the transport reports it lost."""
        self.bounds.release(self)
        transport = self.transport
        if transport is not None:
            transport.close()


def closing_error_response(error: SidecarError) -> web.Response:
    """Vault's error body for bytes that were no request we can answer, closing the connection
    after it (the parser cannot find where the next request would start)."""
    response = error_response(error, new_request_id())
    response.force_close()
    return response


def _who(uid: int) -> str:
    return "a TCP caller" if uid == TCP else f"uid {uid}"


class BoundedSite(web.SockSite):
    """A listening socket served by :class:`BoundedRequestHandler` connections."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        bounds: ConnectionBounds,
        backlog: int,
        ssl_context: Any = None,
        handler: type[BoundedRequestHandler] = BoundedRequestHandler,
    ) -> None:
        super().__init__(runner, sock, backlog=backlog, ssl_context=ssl_context)
        self._bounds = bounds
        self._handler = handler

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        bounds = self._bounds
        handler = self._handler

        def connection() -> BoundedRequestHandler:
            return handler(
                server,
                bounds=bounds,
                loop=loop,
                keepalive_timeout=bounds.limits.idle_timeout,
                access_log=None,
            )

        # A TLS handshake is part of reading the first request: it gets the header deadline.
        handshake = bounds.limits.header_timeout if self._ssl_context is not None else None
        self._server = await loop.create_server(
            connection,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=handshake,
        )


def tcp_listener(address: str, backlog: int) -> socket.socket:
    """A listening TCP socket on ``HOST:PORT`` (``[::1]:8443`` for IPv6)."""
    host, port = tcp_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)
