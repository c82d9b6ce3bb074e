"""The identity each open connection proved, read once when its first request arrives."""

from __future__ import annotations

import time
from typing import Any

from sidecar.identity import ANONYMOUS, Identity
from sidecar.transport.peer import read_peer_credentials
from sidecar.transport.tls import tls_peer


class ConnectionIdentities:
    """Each open connection's identity: its Unix peer credentials or verified client
    certificate, read when its first request arrives and kept for the connection's life.

    Keyed by the asyncio transport in a plain dict (uvloop's transports take no weak references);
    entries of closed transports are dropped whenever the dict has doubled since the last sweep,
    so it stays within twice the number of open connections and a lookup stays one dict get.
    """

    _MIN_SWEEP = 64

    def __init__(self) -> None:
        self._known: dict[Any, Identity] = {}
        self._sweep_at = self._MIN_SWEEP

    def identity(self, transport: Any) -> Identity:
        """The identity of the connection of ``transport`` (anonymous once it is gone)."""
        if transport is None:
            return ANONYMOUS
        known = self._known.get(transport)
        if known is not None:
            return known
        identity = connection_identity(transport)
        if len(self._known) >= self._sweep_at:
            self._known = {t: i for t, i in self._known.items() if not t.is_closing()}
            self._sweep_at = max(self._MIN_SWEEP, 2 * len(self._known))
        self._known[transport] = identity
        return identity

    def open_transports(self) -> list[Any]:
        """The transports of the connections still open, to close them when draining."""
        return [transport for transport in self._known if not transport.is_closing()]

    def __len__(self) -> int:
        return len(self._known)


def connection_identity(transport: Any) -> Identity:
    """What the connection itself proves: Unix peer credentials, or a verified client cert."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        return Identity(tls=tls_peer(ssl_object))
    sock = transport.get_extra_info("socket")
    return Identity(peer=read_peer_credentials(sock, connected_at=time.time()) if sock else None)
