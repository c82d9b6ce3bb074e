"""Client SDK for kms-sidecar: data keys and decryption over the sidecar's Unix socket.

::

    from sidecar.client import AsyncClient

    async with AsyncClient() as client:          # $KMS_SIDECAR_SOCKET or /run/kms-sidecar/...
        data_key = await client.datakey("payments", context={"tenant": "acme"})
        ...  # encrypt locally with data_key.plaintext, store data_key.ciphertext beside the data
        dek = await client.decrypt("payments", data_key.ciphertext, context={"tenant": "acme"})

``Client`` offers the same methods, blocking. ``client.key_pool(key, context=...)`` keeps
single-use data keys issued ahead in batches, so taking one is an in-memory pop
(``KeyPool``/``AsyncKeyPool``; ``key_pools`` for many contexts). ``sidecar.client.envelope``
encrypts bytes, records and whole files locally under fresh data keys. ``docs/client.md`` says
when to use which.

Errors are the sidecar's own (re-exported here), rebuilt from its answer with ``status`` and
``request_id`` set; two more belong to the client::

    SidecarError
    ├── InvalidRequest ── PayloadTooLarge
    ├── DecryptionFailed          every reason a blob does not open
    ├── Unauthenticated, PermissionDenied, UnknownPath, MethodNotAllowed
    ├── RateLimited               .retry_after, seconds, from the Retry-After header
    ├── UpstreamError, UpstreamUnavailable, AuditUnavailable, InternalError
    ├── SidecarUnreachable        the socket is missing, refused, forbidden or went silent
    └── UnexpectedResponse        something answered, but not the sidecar's API
"""

from sidecar.client._calls import DataKey
from sidecar.client._client import DEFAULT_SOCKET_PATH, AsyncClient, Client
from sidecar.client._context_pools import AsyncKeyPools, KeyPools
from sidecar.client._errors import SidecarUnreachable, UnexpectedResponse
from sidecar.client._pool import AsyncKeyPool, KeyPool, PoolStats
from sidecar.errors import (
    AuditUnavailable,
    DecryptionFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    SidecarError,
    Unauthenticated,
    UnknownPath,
    UpstreamError,
    UpstreamUnavailable,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "AsyncClient",
    "AsyncKeyPool",
    "AsyncKeyPools",
    "AuditUnavailable",
    "Client",
    "DataKey",
    "DecryptionFailed",
    "InternalError",
    "InvalidRequest",
    "KeyPool",
    "KeyPools",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "PermissionDenied",
    "PoolStats",
    "RateLimited",
    "SidecarError",
    "SidecarUnreachable",
    "Unauthenticated",
    "UnexpectedResponse",
    "UnknownPath",
    "UpstreamError",
    "UpstreamUnavailable",
]
