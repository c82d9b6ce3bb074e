"""What the server is built from: the components behind small Protocols, in one frozen value.

:class:`Services` is made by the wiring (``server/run.py``) and handed to ``build_app``. The
server only calls the Protocols below; the adapters live with their owners
(``sidecar.auth.caller.CallerAuthenticator``, ``sidecar.policy.authorizer.PolicyAuthorizer``),
and the wiring reloads and closes them through the same Protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from sidecar.audit import AuditLog
from sidecar.config import Config
from sidecar.identity import Identity
from sidecar.keys.keyring import Keyring
from sidecar.keys.signing import Signer
from sidecar.policy.authorizer import AccessRequest
from sidecar.telemetry import Metrics


class Authenticator(Protocol):
    """Turns a request's credentials into an :class:`Identity`."""

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        """``connection`` holds what the socket proved (peer credentials, client certificate);
        ``token`` is the bearer token, if any. Raises ``Unauthenticated``."""
        ...

    async def reload(self) -> None:
        """Re-read what can change while running (JWT signing keys); keep the old on error."""
        ...

    async def close(self) -> None: ...


class Authorizer(Protocol):
    """Allows or refuses one :class:`AccessRequest`."""

    def authorize(self, access: AccessRequest) -> str:
        """The allowing rule's name. Raises ``PermissionDenied`` or ``RateLimited``, whose
        ``rule`` names the rule that refused (``None`` when no rule allowed it)."""
        ...

    async def reload(self) -> None:
        """Re-read the policies; keep the old set on error."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What the server uses, kept in the app under :data:`SERVICES`."""

    config: Config
    keyring: Keyring
    authenticator: Authenticator
    authorizer: Authorizer
    metrics: Metrics
    #: ``None`` when ``audit.path`` is empty.
    audit: AuditLog | None = None
    #: Whether spans are recorded (an exporter is configured, or a provider was installed).
    tracing: bool = False
    #: Signs and verifies with asymmetric keys; caches their public keys.
    signer: Signer | None = None


SERVICES = web.AppKey("services", Services)
