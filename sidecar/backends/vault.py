"""Root keys in a Vault/OpenBao transit engine, over hvac.

A KEK is a transit data key (``datakey/plaintext``): OpenBao makes 256 random bits and returns
them with their ``vault:vN:`` wrapping; unwrapping is a transit ``decrypt``. hvac blocks, so its
calls run in a bounded thread pool off the event loop (``max_concurrency`` at once). The token
comes from :mod:`sidecar.backends.vault_auth` (token, AppRole or JWT, renewed in the background);
a call refused with 403 gets one retry with a new token if the old one turned out to be dead.

With several ``addresses`` (an HA cluster) a call that cannot reach one node — down, sealed,
uninitialised, a standby with no active node, 5xx, 429 — tries the next, starting from the one
that answered last. A refusal (400, 403, 404) from one node of several is believed only once a
second node gives it too, because a standby may not yet have replicated a key, a version or a
token. When no node answers the caller gets ``UpstreamUnavailable``, never ``DecryptionFailed``.
hvac and requests exceptions are translated in :func:`_translated` only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests.exceptions
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.backends.base import KEY_TYPES, TRANSIT_TYPES, NewKek, RootKeyInfo
from sidecar.backends.vault_auth import UpstreamAuth, UpstreamForbidden
from sidecar.backends.vault_logins import auth_method_for
from sidecar.config import VaultConfig
from sidecar.errors import (
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    SidecarError,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

_T = TypeVar("_T")

#: Transit's key types → ours (others are shown as transit names them).
_OUR_TYPES = {v: k for k, v in TRANSIT_TYPES.items()}


class _Unreachable(Exception):
    """This node could not answer; try the next address."""


class _Refused(Exception):
    """This node refused (400, 403, 404); ``error`` is what to raise once another node agrees."""

    def __init__(self, error: SidecarError) -> None:
        super().__init__(error.code)
        self.error = error


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Map hvac/requests exceptions to the sidecar's, in one place.

    Connection failures, sealed, uninitialised or standby-only nodes, 429 and 5xx become
    ``_Unreachable`` so the caller can fail over. Refusals become ``_Refused`` carrying the
    error to report: a missing key (404, or transit's 400 "encryption key not found") is
    ``PermissionDenied`` (key names are not probeable), 403
    is ``UpstreamForbidden``, a 400 on decrypt/rewrap is ``DecryptionFailed``, other refusals
    ``UpstreamError``. Anything else is a bug and propagates.
    """
    try:
        yield
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as exc:
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
        raise _Refused(PermissionDenied()) from None
    except hvac.exceptions.Forbidden:
        raise _Refused(
            UpstreamForbidden(
                f"The key backend refused {operation}: "
                "check the sidecar's upstream token and policy."
            )
        ) from None
    except hvac.exceptions.InvalidRequest as exc:
        if "key not found" in _first_error(exc):  # transit's answer for a missing key
            raise _Refused(PermissionDenied()) from None
        if operation in ("decrypt", "rewrap"):
            raise _Refused(DecryptionFailed(f"upstream refused {operation}")) from None
        if operation in ("sign", "verify", "hmac"):  # the caller's input, not ours, was wrong
            raise _Refused(
                InvalidRequest(f"The key backend rejected {operation}: {_first_error(exc)}")
            ) from None
        raise _Refused(
            UpstreamError(f"The key backend rejected {operation}: {_first_error(exc)}")
        ) from None
    except hvac.exceptions.VaultError as exc:
        raise UpstreamError(f"The key backend failed {operation}: {type(exc).__name__}.") from None


def _first_error(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return str(errors[0])[:200]
    return type(exc).__name__


class VaultBackend:
    """Transit keys in Vault/OpenBao. Thread-safe; construct once per process."""

    kind = "vault"

    def __init__(
        self,
        config: VaultConfig,
        *,
        resolve_path: Callable[[str], str] = lambda p: p,
    ) -> None:
        method = auth_method_for(config, resolve_path)
        method.check()  # a credential that cannot exist stops start-up; the upstream is not asked
        for address in config.addresses:
            if address.startswith("http://") and urlsplit(address).hostname not in _LOOPBACK:
                log.warning(
                    "backend.vault.addresses: %s is plain HTTP to another host; KEKs and the "
                    "upstream token would cross the network unencrypted — use https://",
                    address,
                )
        self._config = config
        self._mount = config.mount
        self._verify: bool | str = resolve_path(config.ca_file) or True
        if isinstance(self._verify, str) and not os.access(self._verify, os.R_OK):
            raise ConfigError(f"backend.vault.ca_file: {self._verify} cannot be read")
        self._auth = UpstreamAuth(method, self._call_with_failover)
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
        body = {"bits": 256, "associated_data": _kek_associated_data(root_key)}

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(f"/v1/{self._mount}/datakey/plaintext/{root_key}", json=body)

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
        body = {"ciphertext": ciphertext, "associated_data": _kek_associated_data(root_key)}

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(f"/v1/{self._mount}/decrypt/{root_key}", json=body)

        return _b64((await self._run("decrypt", call))["data"]["plaintext"])

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

    async def hmac(
        self, root_key: str, data: bytes, *, algorithm: str, key_version: int | None = None
    ) -> tuple[str, int]:
        """Transit ``hmac`` with the upstream key's HMAC key: ``vault:vN:…`` as it wrote it."""
        payload: dict[str, Any] = {"input": base64.b64encode(data).decode()}
        if key_version is not None:
            payload["key_version"] = key_version
        path = f"{self._transit_path('hmac', root_key)}/{algorithm}"

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(path, json=payload)

        mac = str((await self._run("hmac", call))["data"]["hmac"])
        return mac, _version_of(mac)

    async def verify_hmac(self, root_key: str, data: bytes, hmac: str, *, algorithm: str) -> bool:
        """Transit ``verify`` with ``hmac``: whether the upstream computes the same HMAC."""
        payload = {"input": base64.b64encode(data).decode(), "hmac": hmac}
        path = f"{self._transit_path('verify', root_key)}/{algorithm}"

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(path, json=payload)

        return bool((await self._run("hmac", call))["data"]["valid"])

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
            "auth": self._auth.status(),
        }

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._auth.close)

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
        return await loop.run_in_executor(self._pool, self._call_authenticated, operation, call)

    def _call_authenticated(self, operation: str, call: Callable[[hvac.Client], _T]) -> _T:
        """``call`` with the current token; once more with a new one if the token was dead.

        Runs in a worker.
        """
        token = self._auth.token()
        try:
            return self._call_with_failover(operation, call, token)
        except UpstreamForbidden:
            fresh = self._auth.rejected(token)
            if fresh is None:
                raise  # the token is alive: its policy does not allow this
        return self._call_with_failover(operation, call, fresh)

    def _call_with_failover(
        self, operation: str, call: Callable[[hvac.Client], _T], token: str
    ) -> _T:
        """Try each address once, starting from the last that answered. Runs in a worker.

        ``token`` "" sends none (logins). Raises the sidecar's errors only.
        """
        addresses = self._config.addresses
        start = self._preferred
        failures: list[str] = []
        refused: tuple[int, SidecarError] | None = None
        for offset in range(len(addresses)):
            index = (start + offset) % len(addresses)
            try:
                with _translated(operation):
                    result = call(self._client(addresses[index], token))
            except _Unreachable as exc:
                failures.append(f"{addresses[index]} ({exc})")
                continue
            except _Refused as exc:
                if refused is None and len(addresses) > 1:
                    refused = (index, exc.error)  # a standby may lag: ask another node
                    failures.append(f"{addresses[index]} (refused {operation})")
                    continue
                self._mark_ok(refused[0] if refused else index)
                raise exc.error from None
            except SidecarError:
                self._mark_ok(index)  # the node answered, if only with an error
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
            recovered = self._state != "ok"
            if recovered:
                log.info("upstream reachable at %s", self._config.addresses[index])
            self._preferred = index
            self._state = "ok"
            self._last_error = None
            self._last_ok = time.monotonic()
        if recovered:
            self._auth.upstream_answered()

    def _client(self, address: str, token: str) -> hvac.Client:
        """This thread's hvac client for ``address``, carrying ``token``."""
        clients: dict[str, hvac.Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(address)
        if client is None:
            client = hvac.Client(
                url=address, token="", timeout=self._config.timeout, verify=self._verify
            )
            clients[address] = client
        client.token = token
        return client

    # -- UpstreamSigner (sidecar.keys.signing): transit sign/verify, passed through -----------

    async def sign_upstream(
        self,
        root_key: str,
        data: bytes,
        *,
        hash_algorithm: str,
        prehashed: bool,
        marshaling_algorithm: str,
        key_version: int | None = None,
        context: bytes | None = None,
    ) -> tuple[str, int]:
        """Transit ``sign``: the upstream's ``vault:vN:…`` signature as it wrote it, and N.

        The fields keep transit's names and meaning; hvac's own checks (which know only the
        sha2 hashes) are bypassed by posting the request body as transit documents it.
        """
        payload = self._signing_payload(
            data, hash_algorithm, prehashed, marshaling_algorithm, context
        )
        if key_version is not None:
            payload["key_version"] = key_version
        path = self._transit_path("sign", root_key)

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(path, json=payload)

        answer = (await self._run("sign", call))["data"]
        signature = str(answer["signature"])
        return signature, int(answer.get("key_version") or _version_of(signature))

    async def verify_upstream(
        self,
        root_key: str,
        data: bytes,
        signature: str,
        *,
        hash_algorithm: str,
        prehashed: bool,
        marshaling_algorithm: str,
        context: bytes | None = None,
    ) -> bool:
        """Transit ``verify``: whether the upstream accepts ``signature`` over ``data``."""
        payload = self._signing_payload(
            data, hash_algorithm, prehashed, marshaling_algorithm, context
        )
        payload["signature"] = signature
        path = self._transit_path("verify", root_key)

        def call(client: hvac.Client) -> Any:
            return client.adapter.post(path, json=payload)

        return bool((await self._run("verify", call))["data"]["valid"])

    def _transit_path(self, operation: str, root_key: str) -> str:
        from urllib.parse import quote

        return f"/v1/{self._mount}/{operation}/{quote(root_key, safe='')}"

    @staticmethod
    def _signing_payload(
        data: bytes,
        hash_algorithm: str,
        prehashed: bool,
        marshaling_algorithm: str,
        context: bytes | None,
    ) -> dict[str, Any]:
        """The body of a transit sign/verify request (Vault's field names)."""
        payload: dict[str, Any] = {
            "input": base64.b64encode(data).decode(),
            "hash_algorithm": hash_algorithm,
            "prehashed": prehashed,
            "marshaling_algorithm": marshaling_algorithm,
        }
        if context is not None:
            payload["context"] = base64.b64encode(context).decode()
        return payload


def _kek_associated_data(root_key: str) -> str:
    """The transit associated data every KEK is wrapped with, as base64.

    Callers' ``vault:`` ciphertexts are decrypted upstream without associated data, so a wrapped
    KEK taken from a blob's header can never be opened through that passthrough.
    """
    return base64.b64encode(f"kms-sidecar/kek/v1/{root_key}".encode()).decode()


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


def _pem(key_type: str, public_key: str) -> str:
    """A transit public key as PEM: transit gives ed25519 keys as raw base64, others as PEM."""
    if key_type != "ed25519" or public_key.startswith("-----BEGIN"):
        return public_key
    raw = ed25519.Ed25519PublicKey.from_public_bytes(_b64(public_key))
    return raw.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def _created(entry: Any) -> int | None:
    """When a transit key version was made: symmetric versions map to Unix seconds, asymmetric
    ones to an object with an RFC 3339 ``creation_time``."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("creation_time"), str):
        whole, _, fraction = entry["creation_time"].partition(".")  # nanoseconds: drop them
        text = (whole + fraction.lstrip("0123456789")).replace("Z", "+00:00")
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return int(when.timestamp())
    return None


def _info(name: str, data: Mapping[str, Any]) -> RootKeyInfo:
    key_type = str(data.get("type", ""))
    public_keys = {
        int(version): _pem(key_type, str(entry["public_key"]))
        for version, entry in (data.get("keys") or {}).items()
        if isinstance(entry, Mapping) and entry.get("public_key")
    }
    return RootKeyInfo(
        name=name,
        key_type=_OUR_TYPES.get(key_type, key_type),
        latest_version=int(data["latest_version"]),
        min_decryption_version=int(data["min_decryption_version"]),
        public_keys=public_keys,
        created={
            int(version): when
            for version, entry in (data.get("keys") or {}).items()
            if (when := _created(entry)) is not None
        },
        extra={
            "deletion_allowed": bool(data.get("deletion_allowed", False)),
            "supports_signing": bool(data.get("supports_signing", False)),
        },
    )
