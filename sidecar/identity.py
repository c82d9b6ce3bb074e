"""Who is calling: the facts the sidecar could prove about a caller."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The Unix peer of a socket connection (SO_PEERCRED), read when it connected.

    ``exe`` is ``None`` when it could not be read, or when the pid was reused while it was read.
    """

    uid: int
    gid: int
    pid: int
    exe: str | None = None


@dataclass(frozen=True, slots=True)
class JwtClaims:
    """A verified JWT's claims."""

    issuer: str
    subject: str
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """A verified mTLS client certificate."""

    spiffe_id: str | None
    subject: str


@dataclass(frozen=True, slots=True)
class Identity:
    """Everything known about one caller of one request. Any part may be missing."""

    peer: PeerCredentials | None = None
    jwt: JwtClaims | None = None
    tls: TlsPeer | None = None

    @property
    def kind(self) -> str:
        """The strongest credential presented: ``jwt``, ``mtls``, ``unix`` or ``anonymous``."""
        if self.jwt is not None:
            return "jwt"
        if self.tls is not None:
            return "mtls"
        if self.peer is not None:
            return "unix"
        return "anonymous"

    @property
    def spiffe_id(self) -> str | None:
        return self.tls.spiffe_id if self.tls else None


ANONYMOUS = Identity()
