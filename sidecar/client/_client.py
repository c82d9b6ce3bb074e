"""``AsyncClient`` and ``Client``: the sidecar's transit API as Python calls."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from sidecar import __version__
from sidecar.client import _calls
from sidecar.client._calls import Call, DataKey, Ttl, read_answer
from sidecar.client._context_pools import AsyncKeyPools, KeyPools
from sidecar.client._pool import (
    DEFAULT_MAX_AGE,
    DEFAULT_POOL_SIZE,
    AsyncKeyPool,
    Clock,
    KeyPool,
)
from sidecar.client._transport import AsyncUnixTransport, RawAnswer, UnixTransport

T = TypeVar("T")

#: Where the sidecar listens unless ``socket_path`` or ``KMS_SIDECAR_SOCKET`` says otherwise.
DEFAULT_SOCKET_PATH = "/run/kms-sidecar/sidecar.sock"
SOCKET_ENV = "KMS_SIDECAR_SOCKET"


def resolve_socket_path(socket_path: str | os.PathLike[str] | None) -> str:
    """``socket_path`` if given, else ``$KMS_SIDECAR_SOCKET``, else ``DEFAULT_SOCKET_PATH``."""
    if socket_path is not None:
        return os.fspath(socket_path)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


def _headers(token: str | None) -> dict[str, str]:
    headers = {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": f"kms-sidecar-client/{__version__}",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _contexts(
    n: int,
    context: Mapping[str, str] | None,
    contexts: Sequence[Mapping[str, str] | None] | None,
) -> Sequence[Mapping[str, str] | None]:
    if contexts is not None:
        if context is not None:
            raise ValueError("pass context or contexts, not both")
        return contexts
    return [context] * n


def _result(call: Call[T], answer: RawAnswer) -> T:
    return read_answer(call, status=answer.status, retry_after=answer.retry_after, raw=answer.body)


class AsyncClient:
    """The sidecar's API over its Unix socket, for asyncio code.

    ``socket_path`` defaults to ``$KMS_SIDECAR_SOCKET``, then ``/run/kms-sidecar/sidecar.sock``.
    ``token`` (a JWT) is sent as ``Authorization: Bearer``; without it the sidecar knows the caller
    by its Unix peer credentials. ``timeout`` (seconds) bounds connecting (including a wait for
    a free connection when ``max_connections``, default 64, are all busy) and each answer. Use
    it as ``async with AsyncClient() as client:`` or call ``aclose()``; its connections belong
    to the event loop of first use.

    Every method raises a :class:`~sidecar.errors.SidecarError`: the sidecar's own class for
    errors it reports (``DecryptionFailed``, ``PermissionDenied``, ``RateLimited`` with
    ``retry_after``, ...), each with ``status`` and ``request_id``; ``SidecarUnreachable`` when
    the socket cannot be reached.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._headers = _headers(token)
        self._transport = AsyncUnixTransport(
            self.socket_path,
            timeout=timeout,
            headers=self._headers,
            max_connections=max_connections,
        )

    def __repr__(self) -> str:
        return f"AsyncClient(socket_path={self.socket_path!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; the client may not be used afterwards."""
        await self._transport.aclose()

    async def datakey(
        self,
        key: str,
        *,
        bits: int = 256,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
        wrapped: bool = False,
    ) -> DataKey:
        """A new data key of ``bits`` (128, 256 or 512) under ``key``.

        ``context`` is bound to the blob: ``decrypt`` must pass the same one. ``ttl`` (``"5m"``
        or seconds) makes the blob unopenable after it. ``wrapped=True`` returns only the blob
        (``plaintext`` is ``None``), for callers that may issue but not see keys.
        """
        return await self._run(
            _calls.datakey(key, bits=bits, context=context, ttl=ttl, wrapped=wrapped)
        )

    async def datakeys(
        self,
        key: str,
        n: int,
        *,
        bits: int = 256,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
        wrapped: bool = False,
    ) -> list[DataKey]:
        """``n`` new data keys in one request (``batch_input``); as ``datakey`` otherwise.

        If any item fails, the first item's error is raised and no keys are returned.
        """
        return await self._run(
            _calls.datakeys(key, n, bits=bits, context=context, ttl=ttl, wrapped=wrapped)
        )

    async def decrypt(
        self, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """The plaintext of a blob from ``datakey``/``encrypt`` (or a ``vault:vN:`` ciphertext).

        Raises ``DecryptionFailed`` for every reason a blob does not open: wrong key or context,
        tampering, expiry.
        """
        return await self._run(_calls.decrypt(key, ciphertext, context=context))

    async def decrypt_batch(
        self,
        key: str,
        ciphertexts: Sequence[str],
        *,
        context: Mapping[str, str] | None = None,
        contexts: Sequence[Mapping[str, str] | None] | None = None,
    ) -> list[bytes]:
        """The plaintexts of many blobs of ``key`` in one request (``batch_input``), in order.

        ``context`` applies to every blob, or ``contexts`` gives one per blob. If any blob does
        not open, the first failing item's error (``DecryptionFailed``, ...) is raised and no
        plaintext is returned. The sidecar bounds a batch (``max_batch_items``, 1,000 by
        default); larger ones raise ``PayloadTooLarge``.
        """
        return await self._run(
            _calls.decrypt_batch(key, ciphertexts, _contexts(len(ciphertexts), context, contexts))
        )

    def key_pool(
        self,
        key: str,
        *,
        context: Mapping[str, str] | None = None,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        now: Clock = time.monotonic,
    ) -> AsyncKeyPool:
        """A pool of single-use data keys of ``key`` bound to ``context``, refilled ahead.

        Call it inside the event loop; ``await pool.take()`` is then an in-memory pop. At most
        ``size`` keys are held, none older than ``max_age`` seconds; a refill asks for at most
        ``batch`` (default ``min(size, 1000)``). The pool has its own connection; close it with
        ``aclose()`` or ``async with``. See ``docs/client.md`` for what a pool changes.
        """
        transport = AsyncUnixTransport(
            self.socket_path, timeout=self.timeout, headers=self._headers, max_connections=1
        )
        return AsyncKeyPool(
            transport,
            key,
            context=context,
            bits=bits,
            size=size,
            max_age=max_age,
            batch=batch,
            now=now,
        )

    def key_pools(
        self,
        key: str,
        *,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        max_contexts: int = 8,
    ) -> AsyncKeyPools:
        """One ``key_pool`` per encryption context, made on first use, at most ``max_contexts``.

        ``await pools.take(context)``; the least recently used pool is closed (its keys wiped)
        when a new context would exceed the bound.
        """
        return AsyncKeyPools(
            lambda context: self.key_pool(
                key, context=context, bits=bits, size=size, max_age=max_age, batch=batch
            ),
            max_contexts,
        )

    async def encrypt(
        self,
        key: str,
        plaintext: bytes,
        *,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
    ) -> str:
        """A blob holding ``plaintext``, for small payloads (the sidecar's ``max_plaintext_bytes``).

        For anything larger use ``sidecar.client.envelope``. Too large: ``PayloadTooLarge``.
        """
        return await self._run(_calls.encrypt(key, plaintext, context=context, ttl=ttl))

    async def rewrap(
        self, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None
    ) -> str:
        """The blob moved to ``key``'s newest root version; the plaintext stays in the sidecar."""
        return await self._run(_calls.rewrap(key, ciphertext, context=context))

    async def sign(
        self,
        key: str,
        message: bytes,
        *,
        hash_algorithm: str = "sha2-256",
        marshaling: str = "asn1",
    ) -> str:
        """A signature of ``message`` by the asymmetric ``key`` (``sidecar:vN:`` or ``vault:vN:``).

        ``marshaling`` is ``asn1`` (DER) or ``jws`` (raw r‖s, base64url), as in Vault.
        """
        return await self._run(
            _calls.sign(key, message, hash_algorithm=hash_algorithm, marshaling=marshaling)
        )

    async def verify(
        self,
        key: str,
        message: bytes,
        signature: str,
        *,
        hash_algorithm: str = "sha2-256",
        marshaling: str = "asn1",
    ) -> bool:
        """Whether ``signature`` is ``key``'s signature of ``message`` (checked in the sidecar)."""
        return await self._run(
            _calls.verify(
                key, message, signature, hash_algorithm=hash_algorithm, marshaling=marshaling
            )
        )

    async def jwks(self, key: str) -> dict[str, Any]:
        """``key``'s public keys as a JSON Web Key Set (``{"keys": [...]}``)."""
        return await self._run(_calls.jwks(key))

    async def key_info(self, key: str) -> dict[str, Any]:
        """``key``'s metadata as Vault shapes it (``type``, ``latest_version``, ``keys``, ...)."""
        return await self._run(_calls.key_info(key))

    async def health(self) -> dict[str, Any]:
        """The sidecar's health: ``ready`` and, when not ready (HTTP 503), ``reason``.

        A not-ready sidecar is an answer, not an exception; an unreachable one raises
        ``SidecarUnreachable``.
        """
        return await self._run(_calls.health())

    async def status(self) -> dict[str, Any]:
        """Caches, KEKs and upstream state (never key bytes)."""
        return await self._run(_calls.status())

    async def flush(self, key: str | None = None) -> None:
        """Drop the cached KEKs and DEKs of ``key``, or of every key (revocation)."""
        await self._run(_calls.flush(key))

    async def _run(self, call: Call[T]) -> T:
        answer = await self._transport.send(call.method, call.path, call.encoded_body())
        return _result(call, answer)


class Client:
    """The sidecar's API over its Unix socket, blocking; the same methods as ``AsyncClient``.

    Keeps one connection open and reopens it when the sidecar drops it. Calls from several
    threads are safe but take turns. Use it as ``with Client() as client:`` or call ``close()``.
    ``timeout`` (seconds) bounds connecting and each read.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        self._headers = _headers(token)
        self._transport = UnixTransport(self.socket_path, timeout=timeout, headers=self._headers)

    def __repr__(self) -> str:
        return f"Client(socket_path={self.socket_path!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._transport.close()

    def datakey(
        self,
        key: str,
        *,
        bits: int = 256,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
        wrapped: bool = False,
    ) -> DataKey:
        """A new data key under ``key``; see ``AsyncClient.datakey``."""
        return self._run(_calls.datakey(key, bits=bits, context=context, ttl=ttl, wrapped=wrapped))

    def datakeys(
        self,
        key: str,
        n: int,
        *,
        bits: int = 256,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
        wrapped: bool = False,
    ) -> list[DataKey]:
        """``n`` new data keys in one request; see ``AsyncClient.datakeys``."""
        return self._run(
            _calls.datakeys(key, n, bits=bits, context=context, ttl=ttl, wrapped=wrapped)
        )

    def decrypt(
        self, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """The plaintext of a blob; see ``AsyncClient.decrypt``."""
        return self._run(_calls.decrypt(key, ciphertext, context=context))

    def decrypt_batch(
        self,
        key: str,
        ciphertexts: Sequence[str],
        *,
        context: Mapping[str, str] | None = None,
        contexts: Sequence[Mapping[str, str] | None] | None = None,
    ) -> list[bytes]:
        """The plaintexts of many blobs in one request; see ``AsyncClient.decrypt_batch``."""
        return self._run(
            _calls.decrypt_batch(key, ciphertexts, _contexts(len(ciphertexts), context, contexts))
        )

    def key_pool(
        self,
        key: str,
        *,
        context: Mapping[str, str] | None = None,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        now: Clock = time.monotonic,
    ) -> KeyPool:
        """A pool of single-use data keys refilled by a background thread.

        ``pool.take()`` is an in-memory pop; use ``with`` or ``close()``. The same bounds as
        ``AsyncClient.key_pool``; the pool has its own connection.
        """
        transport = UnixTransport(self.socket_path, timeout=self.timeout, headers=self._headers)
        return KeyPool(
            transport,
            key,
            context=context,
            bits=bits,
            size=size,
            max_age=max_age,
            batch=batch,
            now=now,
        )

    def key_pools(
        self,
        key: str,
        *,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        max_contexts: int = 8,
    ) -> KeyPools:
        """One ``key_pool`` per context, at most ``max_contexts``; see ``AsyncClient.key_pools``."""
        return KeyPools(
            lambda context: self.key_pool(
                key, context=context, bits=bits, size=size, max_age=max_age, batch=batch
            ),
            max_contexts,
        )

    def encrypt(
        self,
        key: str,
        plaintext: bytes,
        *,
        context: Mapping[str, str] | None = None,
        ttl: Ttl | None = None,
    ) -> str:
        """A blob holding a small ``plaintext``; see ``AsyncClient.encrypt``."""
        return self._run(_calls.encrypt(key, plaintext, context=context, ttl=ttl))

    def rewrap(self, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None) -> str:
        """The blob moved to the newest root version; see ``AsyncClient.rewrap``."""
        return self._run(_calls.rewrap(key, ciphertext, context=context))

    def sign(
        self,
        key: str,
        message: bytes,
        *,
        hash_algorithm: str = "sha2-256",
        marshaling: str = "asn1",
    ) -> str:
        """A signature of ``message``; see ``AsyncClient.sign``."""
        return self._run(
            _calls.sign(key, message, hash_algorithm=hash_algorithm, marshaling=marshaling)
        )

    def verify(
        self,
        key: str,
        message: bytes,
        signature: str,
        *,
        hash_algorithm: str = "sha2-256",
        marshaling: str = "asn1",
    ) -> bool:
        """Whether ``signature`` is ``key``'s signature of ``message``."""
        return self._run(
            _calls.verify(
                key, message, signature, hash_algorithm=hash_algorithm, marshaling=marshaling
            )
        )

    def jwks(self, key: str) -> dict[str, Any]:
        """``key``'s public keys as a JSON Web Key Set."""
        return self._run(_calls.jwks(key))

    def key_info(self, key: str) -> dict[str, Any]:
        """``key``'s metadata as Vault shapes it."""
        return self._run(_calls.key_info(key))

    def health(self) -> dict[str, Any]:
        """The sidecar's health, ready or not; see ``AsyncClient.health``."""
        return self._run(_calls.health())

    def status(self) -> dict[str, Any]:
        """Caches, KEKs and upstream state (never key bytes)."""
        return self._run(_calls.status())

    def flush(self, key: str | None = None) -> None:
        """Drop the cached KEKs and DEKs of ``key``, or of every key."""
        self._run(_calls.flush(key))

    def _run(self, call: Call[T]) -> T:
        answer = self._transport.send(call.method, call.path, call.encoded_body())
        return _result(call, answer)
