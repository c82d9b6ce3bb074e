"""The KMS v2 provider's socket and gRPC server, in the daemon's event loop.

The socket is made by the same :func:`~sidecar.transport.listener.unix_listener` as the main one, so
it has ``kms_v2.socket_mode`` from the first instant and is removed on exit; grpclib serves on that
already-bound socket (grpcio's server binds its own and exposes no peer credentials, which the
policy needs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from grpclib.server import Server

from sidecar.audit import AuditLog
from sidecar.config import Config
from sidecar.keys.keyring import Keyring
from sidecar.kms.provider import Authenticator, Authorizer, KmsV2Provider, root_key_label
from sidecar.telemetry import Metrics
from sidecar.transport.listener import unix_listener

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def kms_v2_server(
    config: Config, provider: KmsV2Provider, *, drain_timeout: float
) -> AsyncIterator[str]:
    """Serve ``provider`` on ``kms_v2.socket`` until the block ends; yields the socket's path.

    On exit new calls are refused with ``UNAVAILABLE``, calls in flight get up to
    ``drain_timeout`` seconds to finish, then the server and the socket go.
    """
    kms = config.kms_v2
    path = config.resolve_path(kms.socket)
    with unix_listener(
        path, kms.socket_mode_bits, kms.socket_group, setting="kms_v2.socket"
    ) as sock:
        server = Server([provider])
        await server.start(sock=sock)
        log.info("KMS v2 provider for key %s on %s", provider.key_name, path)
        try:
            yield path
        finally:
            await provider.drain(drain_timeout)
            server.close()
            await server.wait_closed()


def kms_v2_provider(
    config: Config,
    *,
    keyring: Keyring,
    authenticator: Authenticator,
    authorizer: Authorizer,
    metrics: Metrics,
    audit: AuditLog | None,
    tracing: bool,
) -> KmsV2Provider:
    """The provider for ``[kms_v2]``; its key ids name the backend, the mount or token, the key."""
    key_name = config.kms_v2.key
    kind = keyring.backend.kind
    where = {"vault": config.backend.vault.mount, "pkcs11": config.backend.pkcs11.token_label}
    return KmsV2Provider(
        key_name=key_name,
        root_key_label=root_key_label(
            kind, where.get(kind, "local"), config.root_key_name(key_name)
        ),
        keyring=keyring,
        authenticator=authenticator,
        authorizer=authorizer,
        metrics=metrics,
        audit=audit,
        tracing=tracing,
    )
