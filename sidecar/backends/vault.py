"""Root keys in a Vault/OpenBao transit engine, over hvac.

A KEK is a transit data key (``datakey/plaintext``): OpenBao makes 256 random bits and returns
them with their ``vault:vN:`` wrapping; unwrapping is a transit ``decrypt``. hvac blocks, so its
calls run in a bounded thread pool off the event loop (``max_concurrency`` at once). With several
``addresses`` a call that cannot reach one node tries the next, starting from the one that
answered last. hvac and requests exceptions are translated in :func:`_translated` only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests.exceptions

from sidecar.backends.base import KEY_TYPES, NewKek, RootKeyInfo
from sidecar.config import VaultConfig
from sidecar.errors import (
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    SidecarError,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Our key types → transit's.
TRANSIT_TYPES = {"aes256": "aes256-gcm96", "ec-p256": "ecdsa-p256", "ed25519": "ed25519"}
#: Transit's key types → ours (others are shown as transit names them).
_OUR_TYPES = {v: k for k, v in TRANSIT_TYPES.items()}


class _Unreachable(Exception):
    """This node could not answer; try the next address."""


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Map hvac/requests exceptions to the sidecar's, in one place.

    Connection failures, sealed or standby-only nodes and 5xx become ``_Unreachable`` so the
    caller can fail over; a missing key is ``PermissionDenied`` (key names are not probeable);
    other refusals are ``UpstreamError``. Anything else is a bug and propagates.
    """
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Unreachable(f"{operation}: {type(exc).__name__}") from None
    except (
        hvac.exceptions.VaultDown,
        hvac.exceptions.BadGateway,
        hvac.exceptions.InternalServerError,
        hvac.exceptions.VaultNotInitialized,
        hvac.exceptions.RateLimitExceeded,
    ) as exc:
        raise _Unreachable(f"{operation}: {type(exc).__name__}") from None
    except hvac.exceptions.InvalidPath:
        raise PermissionDenied() from None
    except hvac.exceptions.Forbidden:
        raise UpstreamError(
            f"The key backend refused {operation}: check the sidecar's upstream token and policy."
        ) from None
    except hvac.exceptions.InvalidRequest as exc:
        if operation in ("decrypt", "rewrap"):
            raise DecryptionFailed(f"upstream refused {operation}") from None
        raise UpstreamError(f"The key backend rejected {operation}: {_first_error(exc)}") from None
    except hvac.exceptions.VaultError as exc:
        raise UpstreamError(f"The key backend failed {operation}: {type(exc).__name__}.") from None


def _first_error(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return str(errors[0])[:200]
    return type(exc).__name__


class TokenSource:
    """The upstream token: from ``token_file`` (re-read when it changes) or ``token_env``."""

    def __init__(self, config: VaultConfig, resolve: Callable[[str], str] = lambda p: p) -> None:
        self._env = config.token_env
        self._file = resolve(config.token_file)
        self._mtime: float | None = None
        self._token = ""

    def token(self) -> str:
        if not self._file:
            return os.environ.get(self._env, "")
        try:
            mtime = os.stat(self._file).st_mtime
            if mtime != self._mtime:
                with open(self._file) as fh:
                    self._token = fh.read().strip()
                self._mtime = mtime
        except OSError as exc:
            raise UpstreamUnavailable(
                f"The upstream token file {self._file} cannot be read ({exc.strerror})."
            ) from None
        return self._token


class VaultBackend:
    """Transit keys in Vault/OpenBao. Thread-safe; construct once per process."""

    kind = "vault"

    def __init__(
        self,
        config: VaultConfig,
        *,
        resolve_path: Callable[[str], str] = lambda p: p,
    ) -> None:
        if config.auth_method != "token":
            raise InvalidRequest(
                f"backend.vault.auth_method {config.auth_method!r} is not supported; use 'token'."
            )
        self._config = config
        self._mount = config.mount
        self._verify: bool | str = resolve_path(config.ca_file) or True
        self._tokens = TokenSource(config, resolve_path)
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="vault")
        self._local = threading.local()
        self._preferred = 0
        self._lock = threading.Lock()
        self._state = "unknown"
        self._last_error: str | None = None
        self._last_ok: float | None = None
        #: Calls made upstream, by operation (for status and tests).
        self.calls: dict[str, int] = {}

    # -- RootKeyBackend ---------------------------------------------------------------------

    async def generate_kek(self, root_key: str) -> NewKek:
        def call(client: hvac.Client) -> Any:
            return client.secrets.transit.generate_data_key(
                root_key, key_type="plaintext", bits=256, mount_point=self._mount
            )

        data = (await self._run("datakey", call))["data"]
        wrapped = data["ciphertext"]
        return NewKek(
            plaintext=_b64(data["plaintext"]),
            wrapped=wrapped.encode(),
            root_version=_version_of(wrapped),
        )

    async def unwrap_kek(self, root_key: str, wrapped: bytes) -> bytes:
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionFailed("wrapped KEK is not a transit ciphertext") from None
        return await self.decrypt_ciphertext(root_key, ciphertext, None)

    async def key_info(self, root_key: str) -> RootKeyInfo:
        def call(client: hvac.Client) -> Any:
            return client.secrets.transit.read_key(root_key, mount_point=self._mount)

        return _info(root_key, (await self._run("read", call))["data"])

    async def rotate(self, root_key: str) -> RootKeyInfo:
        def call(client: hvac.Client) -> Any:
            client.secrets.transit.rotate_key(root_key, mount_point=self._mount)
            return client.secrets.transit.read_key(root_key, mount_point=self._mount)

        return _info(root_key, (await self._run("rotate", call))["data"])

    async def create(self, root_key: str, key_type: str) -> RootKeyInfo:
        if key_type not in KEY_TYPES:
            raise InvalidRequest(
                f"Unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}."
            )

        def call(client: hvac.Client) -> Any:
            client.secrets.transit.create_key(
                root_key, key_type=TRANSIT_TYPES[key_type], mount_point=self._mount
            )
            return client.secrets.transit.read_key(root_key, mount_point=self._mount)

        return _info(root_key, (await self._run("create", call))["data"])

    async def list_keys(self) -> list[str]:
        def call(client: hvac.Client) -> Any:
            try:
                return client.secrets.transit.list_keys(mount_point=self._mount)
            except hvac.exceptions.InvalidPath:
                return {"data": {"keys": []}}

        return sorted((await self._run("list", call))["data"]["keys"])

    async def destroy(self, root_key: str) -> None:
        def call(client: hvac.Client) -> None:
            client.secrets.transit.update_key_configuration(
                root_key, deletion_allowed=True, mount_point=self._mount
            )
            client.secrets.transit.delete_key(root_key, mount_point=self._mount)

        await self._run("destroy", call)

    def status(self) -> Mapping[str, Any]:
        return {
            "kind": self.kind,
            "state": self._state,
            "address": self._config.addresses[self._preferred],
            "addresses": list(self._config.addresses),
            "last_error": self._last_error,
            "last_ok_seconds_ago": None
            if self._last_ok is None
            else round(time.monotonic() - self._last_ok, 3),
            "calls": dict(self.calls),
        }

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- UpstreamCiphertexts ----------------------------------------------------------------

    async def decrypt_ciphertext(
        self, root_key: str, ciphertext: str, context: bytes | None
    ) -> bytes:
        def call(client: hvac.Client) -> Any:
            return client.secrets.transit.decrypt_data(
                root_key, ciphertext, context=_b64_text(context), mount_point=self._mount
            )

        return _b64((await self._run("decrypt", call))["data"]["plaintext"])

    async def rewrap_ciphertext(self, root_key: str, ciphertext: str, context: bytes | None) -> str:
        def call(client: hvac.Client) -> Any:
            return client.secrets.transit.rewrap_data(
                root_key, ciphertext, context=_b64_text(context), mount_point=self._mount
            )

        return str((await self._run("rewrap", call))["data"]["ciphertext"])

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, operation: str, call: Callable[[hvac.Client], _T]) -> _T:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call_with_failover, operation, call)

    def _call_with_failover(self, operation: str, call: Callable[[hvac.Client], _T]) -> _T:
        """Try each address once, starting from the last that answered. Runs in a worker."""
        addresses = self._config.addresses
        start = self._preferred
        failures = []
        for offset in range(len(addresses)):
            index = (start + offset) % len(addresses)
            try:
                with _translated(operation):
                    result = call(self._client(addresses[index]))
            except _Unreachable as exc:
                failures.append(f"{addresses[index]} ({exc})")
                continue
            except SidecarError:
                self._mark_ok(index)  # the node answered, if only with a refusal
                raise
            self._mark_ok(index)
            return result
        with self._lock:
            self._state = "unavailable"
            self._last_error = "; ".join(failures)
        log.warning("upstream %s failed on every address: %s", operation, "; ".join(failures))
        raise UpstreamUnavailable()

    def _mark_ok(self, index: int) -> None:
        with self._lock:
            if self._state != "ok":
                log.info("upstream reachable at %s", self._config.addresses[index])
            self._preferred = index
            self._state = "ok"
            self._last_error = None
            self._last_ok = time.monotonic()

    def _client(self, address: str) -> hvac.Client:
        """This thread's hvac client for ``address``, with the current token."""
        clients: dict[str, hvac.Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(address)
        if client is None:
            client = hvac.Client(url=address, timeout=self._config.timeout, verify=self._verify)
            clients[address] = client
        client.token = self._tokens.token()
        return client


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError):
        raise UpstreamError("The key backend returned malformed base64.") from None


def _b64_text(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _version_of(ciphertext: str) -> int:
    """N in ``vault:vN:…``."""
    try:
        prefix, version, _ = ciphertext.split(":", 2)
        if prefix != "vault" or not version.startswith("v"):
            raise ValueError(ciphertext[:12])
        return int(version[1:])
    except ValueError:
        raise UpstreamError("The key backend returned an unexpected ciphertext.") from None


def _info(name: str, data: Mapping[str, Any]) -> RootKeyInfo:
    key_type = str(data.get("type", ""))
    public_keys = {
        int(version): str(entry["public_key"])
        for version, entry in (data.get("keys") or {}).items()
        if isinstance(entry, Mapping) and entry.get("public_key")
    }
    return RootKeyInfo(
        name=name,
        key_type=_OUR_TYPES.get(key_type, key_type),
        latest_version=int(data["latest_version"]),
        min_decryption_version=int(data["min_decryption_version"]),
        public_keys=public_keys,
        extra={
            "deletion_allowed": bool(data.get("deletion_allowed", False)),
            "supports_signing": bool(data.get("supports_signing", False)),
        },
    )
