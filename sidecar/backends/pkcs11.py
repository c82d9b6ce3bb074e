"""Root keys as objects on a PKCS#11 token (an HSM, or SoftHSM2 for development).

Every version of a root key is its own token object, labelled with the key's name and carrying
``CKA_ID = b"<name>:v<N>"``: an AES-256 secret key for ``aes256``, a key pair (both halves share
label and id) for ``ec-p256`` and ``ed25519``. Secret and private keys are made ``SENSITIVE`` and
never ``EXTRACTABLE``, so their bytes never leave the HSM. ``rotate`` adds version N+1 and keeps
the older ones, so KEKs wrapped under them still open; ``min_decryption_version`` is the lowest
version still on the token (retire a version by destroying its object).

A KEK is 256 bits from the HSM's RNG, encrypted inside the HSM under the latest AES version with
AES-GCM (a fresh 96-bit IV, also from the HSM; AAD ``b"kms-sidecar:kek:<name>:v<N>"``). Its
wrapped form is ``b"hsm:v<N>:" + iv + ciphertext_and_tag`` (60 bytes after the prefix).

Every PKCS#11 call runs on one owner thread per module (:mod:`sidecar.backends.pkcs11_owner`,
which also translates python-pkcs11's exceptions, in one place); the event loop only awaits. The
objects' layout on the token is :mod:`sidecar.backends.pkcs11_objects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from sidecar.backends.base import KEY_TYPES, NewKek, RootKeyInfo
from sidecar.backends.pkcs11_objects import (
    OBJECT_ID,
    KeyObjects,
    capable,
    find,
    find_aes_version,
    generate,
    kek_aad,
    public_pem,
    versioned_objects,
)
from sidecar.backends.pkcs11_owner import (
    OWNERS_LOCK,
    SESSION_LOST,
    TokenSession,
    owner_for,
    translated,
)
from sidecar.config import KEY_NAME_RULE, Pkcs11Config, is_key_name
from sidecar.errors import (
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The prefix of every wrapped KEK; the root version follows it, then ``:``.
WRAPPED_PREFIX = b"hsm:v"
_IV_BYTES = 12
_KEK_BYTES = 32
_TAG_BYTES = 16
_WRAPPED_BODY = _IV_BYTES + _KEK_BYTES + _TAG_BYTES
_WRAPPED = re.compile(rb"hsm:v([1-9][0-9]{0,8}):(.*)", re.DOTALL)


def read_pin(config: Pkcs11Config, resolve_path: Callable[[str], str] = lambda p: p) -> str:
    """The user PIN: the first line of ``pin_file`` if set, else the ``pin_env`` variable.

    Raises ``ConfigError`` when it is missing or the file is readable by other users. The PIN
    never appears in a message.
    """
    if config.pin_file:
        path = resolve_path(config.pin_file)
        try:
            with open(path, encoding="utf-8") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                text = fh.readline()
        except OSError as exc:
            raise ConfigError(
                f"backend.pkcs11.pin_file: {path} cannot be read ({exc.strerror})"
            ) from None
        if mode & stat.S_IRWXO:
            raise ConfigError(
                f"backend.pkcs11.pin_file: {path} is accessible by other users; chmod 600 it"
            )
        pin = text.rstrip("\r\n")
        if not pin:
            raise ConfigError(f"backend.pkcs11.pin_file: {path} is empty")
        return pin
    pin = os.environ.get(config.pin_env, "")
    if not pin:
        raise ConfigError(
            f"backend.pkcs11.pin_env: the environment variable {config.pin_env!r} is not set "
            "(or set backend.pkcs11.pin_file)"
        )
    return pin


def _no_hmac() -> InvalidRequest:
    """Root keys on the token are AES keys made for encryption (no ``CKA_SIGN``) or key pairs;
    none can make a ``CKM_SHA*_HMAC``."""
    return InvalidRequest(
        "HMAC is not available with the pkcs11 backend: its root keys are AES encryption keys "
        "and signing key pairs, not HMAC keys; use a vault backend key for transit/hmac."
    )


class Pkcs11Backend:
    """Root keys on a PKCS#11 token. Construct once per process; cheap until the first call.

    The PIN is read at construction (``ConfigError`` if missing or if ``pin_file`` is open to
    other users); ``resolve_path`` makes a relative ``pin_file`` absolute. The first call loads
    the module and logs in. ``call_timeout`` (seconds) bounds how long a
    caller waits for the owner thread; past it the call fails ``UpstreamUnavailable``. Always
    :meth:`close` it: the last backend on a module closes the sessions and finalizes the module.
    """

    kind = "pkcs11"

    def __init__(
        self,
        config: Pkcs11Config,
        *,
        resolve_path: Callable[[str], str] = lambda p: p,
        call_timeout: float = 30.0,
    ) -> None:
        self._label = config.token_label
        self._module = config.module
        self._pin = read_pin(config, resolve_path)
        self._call_timeout = call_timeout
        self._owner = owner_for(self._module, self._label)
        self._closed = False
        self._state = "unknown"
        self._last_error: str | None = None
        self._last_ok: float | None = None
        #: Calls made to the HSM, by operation (for status and tests).
        self.calls: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"Pkcs11Backend(token={self._label!r}, module={self._module!r}, state={self._state!r})"
        )

    # -- RootKeyBackend ---------------------------------------------------------------------

    async def generate_kek(self, root_key: str) -> NewKek:
        name = self._existing_name(root_key)

        def call(ts: TokenSession) -> NewKek:
            found = find(ts.session, name)
            if found.key_type != "aes256":
                raise InvalidRequest(
                    f"Key {name!r} is an {found.key_type} key; only aes256 keys make data keys."
                )
            version = max(found.private)
            key = capable(found.private[version], pkcs11.SecretKey)
            ts.aes_keys[(name, version)] = key
            random = ts.session.generate_random(8 * (_KEK_BYTES + _IV_BYTES))
            plaintext, iv = random[:_KEK_BYTES], random[_KEK_BYTES:]
            sealed = capable(key, pkcs11.EncryptMixin).encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, kek_aad(name, version)),
            )
            if not isinstance(sealed, bytes):
                raise UpstreamError("The HSM returned an unexpected AES-GCM result.")
            wrapped = WRAPPED_PREFIX + str(version).encode() + b":" + iv + sealed
            return NewKek(plaintext=plaintext, wrapped=wrapped, root_version=version)

        return await self._run("generate_kek", call)

    async def unwrap_kek(self, root_key: str, wrapped: bytes) -> bytes:
        name = self._existing_name(root_key)
        match = _WRAPPED.fullmatch(wrapped)
        if match is None or len(match.group(2)) != _WRAPPED_BODY:
            raise DecryptionFailed("wrapped KEK is not an HSM-wrapped KEK")
        version = int(match.group(1))
        iv, sealed = match.group(2)[:_IV_BYTES], match.group(2)[_IV_BYTES:]

        def call(ts: TokenSession) -> bytes:
            key = ts.aes_keys.get((name, version))
            if key is None:
                key = find_aes_version(ts.session, name, version)
                ts.aes_keys[(name, version)] = key
            plaintext = capable(key, pkcs11.DecryptMixin).decrypt(
                sealed,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, kek_aad(name, version)),
            )
            if not isinstance(plaintext, bytes) or len(plaintext) != _KEK_BYTES:
                raise DecryptionFailed("wrapped KEK has the wrong length")
            return plaintext

        return await self._run("unwrap_kek", call, opening=True)

    async def key_info(self, root_key: str) -> RootKeyInfo:
        name = self._existing_name(root_key)
        return await self._run("key_info", lambda ts: self._info(name, find(ts.session, name)))

    async def rotate(self, root_key: str) -> RootKeyInfo:
        name = self._existing_name(root_key)

        def call(ts: TokenSession) -> RootKeyInfo:
            found = find(ts.session, name)
            version = max(found.private) + 1
            generate(ts, name, found.key_type, version)
            log.info("rotated HSM key %r to version %d", name, version)
            return self._info(name, find(ts.session, name))

        return await self._run("rotate", call)

    async def create(self, root_key: str, key_type: str) -> RootKeyInfo:
        if key_type not in KEY_TYPES:
            raise InvalidRequest(
                f"Unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}."
            )
        if not is_key_name(root_key):
            raise InvalidRequest(f"{KEY_NAME_RULE[0].upper()}{KEY_NAME_RULE[1:]}.")

        def call(ts: TokenSession) -> RootKeyInfo:
            with contextlib.suppress(PermissionDenied):
                return self._info(root_key, find(ts.session, root_key))
            generate(ts, root_key, key_type, 1)
            log.info("created %s HSM key %r", key_type, root_key)
            return self._info(root_key, find(ts.session, root_key))

        return await self._run("create", call)

    async def list_keys(self) -> list[str]:
        def call(ts: TokenSession) -> list[str]:
            names: set[str] = set()
            for object_class in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
                for obj in list(ts.session.get_objects({Attribute.CLASS: object_class})):
                    attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
                    label, object_id = attrs.get(Attribute.LABEL), attrs.get(Attribute.ID)
                    if isinstance(label, str) and isinstance(object_id, bytes):
                        parsed = OBJECT_ID.fullmatch(object_id)
                        if parsed is not None and parsed.group(1) == label.encode():
                            names.add(label)
            return sorted(names)

        return await self._run("list_keys", call)

    async def destroy(self, root_key: str) -> None:
        name = self._existing_name(root_key)

        def call(ts: TokenSession) -> None:
            doomed = [obj for obj, _ in versioned_objects(ts.session, name)]
            if not doomed:
                raise PermissionDenied()
            for key in [k for k in ts.aes_keys if k[0] == name]:
                del ts.aes_keys[key]
            for obj in doomed:
                obj.destroy()
            log.info("destroyed HSM key %r (%d objects)", name, len(doomed))

        await self._run("destroy", call)

    def status(self) -> Mapping[str, Any]:
        return {
            "kind": self.kind,
            "token": self._label,
            "module": self._module,
            "state": self._state,
            "last_error": self._last_error,
            "last_ok_seconds_ago": None
            if self._last_ok is None
            else round(time.monotonic() - self._last_ok, 3),
            "calls": dict(self.calls),
        }

    async def close(self) -> None:
        """Stop using the token; the last user of a module closes its sessions and finalizes it."""
        if self._closed:
            return
        self._closed = True
        with OWNERS_LOCK:
            self._owner.users[self._label] -= 1
        released = asyncio.wrap_future(self._owner.submit(self._owner.release_unused))
        try:
            await asyncio.wait_for(released, self._call_timeout)
        except asyncio.TimeoutError:
            log.warning("HSM token %r did not release its session in time", self._label)

    async def hmac(
        self, root_key: str, data: bytes, *, algorithm: str, key_version: int | None = None
    ) -> tuple[str, int]:
        raise _no_hmac()

    async def verify_hmac(self, root_key: str, data: bytes, hmac: str, *, algorithm: str) -> bool:
        raise _no_hmac()

    # -- beyond RootKeyBackend --------------------------------------------------------------

    async def sign(self, root_key: str, version: int | None, digest: bytes) -> tuple[int, bytes]:
        """Sign with version ``version`` (None: the latest) of an asymmetric key, inside the HSM.

        For ``ec-p256`` keys ``digest`` is the hash of the message, computed by the caller
        (``CKM_ECDSA``; 1 to 64 bytes) and the signature is raw ``r || s`` (64 bytes). For
        ``ed25519`` keys it is the message itself (pure Ed25519 hashes internally). Returns the
        version used and the signature. ``InvalidRequest`` for an AES key or a missing version.
        """
        name = self._existing_name(root_key)
        if not digest or len(digest) > 64 * 1024:
            raise InvalidRequest("The input to sign must be 1 byte to 64 KiB long.")

        def call(ts: TokenSession) -> tuple[int, bytes]:
            found = find(ts.session, name)
            if found.key_type == "aes256":
                raise InvalidRequest(f"Key {name!r} is an aes256 key; it cannot sign.")
            used = max(found.private) if version is None else version
            found_key = found.private.get(used)
            if found_key is None:
                raise InvalidRequest(f"Key {name!r} has no version {used}.")
            key = capable(found_key, pkcs11.SignMixin)
            if found.key_type == "ec-p256":
                if len(digest) > 64:
                    raise InvalidRequest("An ECDSA digest must be at most 64 bytes long.")
                return used, key.sign(digest, mechanism=Mechanism.ECDSA)
            return used, key.sign(digest, mechanism=Mechanism.EDDSA)

        return await self._run("sign", call)

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(
        self, operation: str, call: Callable[[TokenSession], _T], *, opening: bool = False
    ) -> _T:
        """Run ``call`` on the owner thread with this backend's token session."""
        if self._closed:
            raise UpstreamUnavailable("The HSM backend has been closed.")
        self.calls[operation] = self.calls.get(operation, 0) + 1
        future = self._owner.submit(lambda: self._in_owner(call, opening))
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), self._call_timeout)
        except asyncio.TimeoutError:
            self._mark_unavailable(f"no answer within {self._call_timeout:g} s")
            raise UpstreamUnavailable(
                f"HSM token {self._label!r} did not answer within {self._call_timeout:g} s."
            ) from None
        except UpstreamUnavailable as exc:
            self._mark_unavailable(exc.message)
            raise
        self._state = "ok"
        self._last_error = None
        self._last_ok = time.monotonic()
        return result

    def _in_owner(self, call: Callable[[TokenSession], _T], opening: bool) -> _T:
        """Owner thread: open the session if needed and run ``call``, once more if it was lost."""
        owner = self._owner
        with translated(self._label, opening=opening):
            ts = owner.token_session(self._label, self._pin)
            try:
                return call(ts)
            except SESSION_LOST as exc:
                lost = type(exc).__name__
                log.warning(
                    "HSM session on token %r lost (%s); logging in again", self._label, lost
                )
                owner.drop(self._label)
                return call(owner.token_session(self._label, self._pin))

    def _mark_unavailable(self, reason: str) -> None:
        if self._state != "unavailable":
            log.warning("HSM token %r unavailable: %s", self._label, reason)
        self._state = "unavailable"
        self._last_error = reason

    @staticmethod
    def _existing_name(root_key: str) -> str:
        """``root_key`` if it could be a key of ours; ``PermissionDenied`` otherwise."""
        if not is_key_name(root_key):
            raise PermissionDenied()
        return root_key

    def _info(self, name: str, found: KeyObjects) -> RootKeyInfo:
        public_keys = {
            version: public_pem(found.key_type, obj[Attribute.EC_POINT])
            for version, obj in sorted(found.public.items())
        }
        return RootKeyInfo(
            name=name,
            key_type=found.key_type,
            latest_version=max(found.private),
            min_decryption_version=min(found.private),
            public_keys=public_keys,
            extra={"token": self._label, "versions": sorted(found.private)},
        )
