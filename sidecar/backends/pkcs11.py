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

One owner: SoftHSM under python-pkcs11 is not thread-safe (python-pkcs11 calls ``C_Initialize``
without ``CKF_OS_LOCKING_OK``; concurrent calls crash or fail). So every PKCS#11 call in the
process, for every backend instance using the same module, runs on one dedicated thread
(:class:`_HsmOwner`), which also holds the single logged-in session per token. The event loop
only awaits. When the last backend using a module closes, the owner closes its sessions and
finalizes the library; the next one re-initializes it (SoftHSM re-reads ``SOFTHSM2_CONF`` and
rescans its tokens then).

python-pkcs11 exceptions are translated in :func:`_translated` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams

from sidecar.backends.base import KEY_TYPES, NewKek, RootKeyInfo
from sidecar.config import Pkcs11Config
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
_O = TypeVar("_O")

#: The prefix of every wrapped KEK; the root version follows it, then ``:``.
WRAPPED_PREFIX = b"hsm:v"
_IV_BYTES = 12
_KEK_BYTES = 32
_TAG_BYTES = 16
_WRAPPED_BODY = _IV_BYTES + _KEK_BYTES + _TAG_BYTES
_WRAPPED = re.compile(rb"hsm:v([1-9][0-9]{0,8}):(.*)", re.DOTALL)
_OBJECT_ID = re.compile(rb"(.+):v([1-9][0-9]{0,8})", re.DOTALL)
#: Key names the backend will make into labels (the same rule as ``[keys.<name>]``).
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: DER of the named-curve parameters we make and recognise.
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
_ED25519_PARAMS = bytes.fromhex("06032b6570")  # OID 1.3.101.112
_ED25519_PARAMS_NAMED = b"\x13\x0cedwards25519"  # PrintableString, PKCS#11 3.0 style

# Errors after which the session (or a cached object handle) is no longer usable: drop the
# session, open and log in again, and retry the call once.
_SESSION_LOST: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
)
_PIN_REFUSED: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinExpired,
    p11e.UserPinNotInitialized,
)
_UNREACHABLE: tuple[type[p11e.PKCS11Error], ...] = (
    *_SESSION_LOST,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.TokenNotRecognised,
    p11e.SlotIDInvalid,
    p11e.SessionCount,
    p11e.HostMemory,
)
# What a token answers when AES-GCM authentication fails (SoftHSM 2.6 says GeneralError).
_DOES_NOT_OPEN: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.GeneralError,
)


class _ModuleUnusable(Exception):
    """The PKCS#11 module could not be loaded or initialised."""


@contextlib.contextmanager
def _translated(token_label: str, *, opening: bool = False) -> Iterator[None]:
    """Map python-pkcs11 exceptions to the sidecar's, in one place.

    ``opening`` marks a call that decrypts caller-supplied bytes: data errors there mean the
    bytes do not open (``DecryptionFailed``). Messages name the token, never the PIN. Anything
    that is not a PKCS#11 error propagates untouched.
    """
    try:
        yield
    except _ModuleUnusable as exc:
        log.warning("PKCS#11 module for token %r unusable: %s", token_label, exc)
        raise UpstreamUnavailable(
            f"The PKCS#11 module for HSM token {token_label!r} could not be loaded."
        ) from None
    except p11e.PKCS11Error as exc:
        kind = type(exc).__name__
        if opening and isinstance(exc, _DOES_NOT_OPEN):
            raise DecryptionFailed(f"HSM refused to open the wrapped KEK ({kind})") from None
        if isinstance(exc, p11e.PinLocked):
            raise UpstreamUnavailable(
                f"HSM token {token_label!r} has locked its user PIN; an officer must reset it."
            ) from None
        if isinstance(exc, _PIN_REFUSED):
            raise UpstreamUnavailable(
                f"HSM token {token_label!r} refused the PIN; "
                "check backend.pkcs11.pin_env or backend.pkcs11.pin_file."
            ) from None
        if isinstance(exc, p11e.NoSuchToken):
            raise UpstreamUnavailable(
                f"HSM token {token_label!r} was not found by the PKCS#11 module."
            ) from None
        if isinstance(exc, _UNREACHABLE):
            log.warning("HSM token %r unavailable: %s", token_label, kind)
            raise UpstreamUnavailable(
                f"HSM token {token_label!r} is unavailable ({kind}); retry later."
            ) from None
        if isinstance(exc, p11e.NoSuchKey):
            raise PermissionDenied() from None
        if isinstance(exc, p11e.MultipleObjectsReturned | p11e.MultipleTokensReturned):
            raise UpstreamError(
                f"HSM token {token_label!r} holds duplicate objects where one was expected."
            ) from None
        log.warning("HSM token %r refused an operation: %s", token_label, kind)
        raise UpstreamError(f"HSM token {token_label!r} refused the operation ({kind}).") from None


@dataclass
class _TokenSession:
    """The one logged-in session this process holds on a token. Owner thread only."""

    label: str
    pin: str = field(repr=False)
    session: pkcs11.Session
    mechanisms: frozenset[Mechanism]
    #: (key name, version) → the AES secret key object, so unwraps skip the object search.
    aes_keys: dict[tuple[str, int], pkcs11.SecretKey] = field(default_factory=dict)


class _HsmOwner:
    """The one thread that makes every PKCS#11 call to one module in this process.

    Shared by every backend using the module (see :func:`_owner_for`); it never goes away, so
    there is never a second thread calling the library.
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11-owner")
        #: How many open backends use each token label (guarded by ``_OWNERS_LOCK``).
        self.users: dict[str, int] = {}
        # Owner thread only:
        self._lib: Any = None
        self._tokens: dict[str, _TokenSession] = {}
        #: Token label → SHA-256 of a PIN the token refused; never offered again (lockout).
        self._refused: dict[str, bytes] = {}

    def submit(self, fn: Callable[[], _T]) -> Future[_T]:
        """Run ``fn`` on the owner thread."""
        return self._executor.submit(fn)

    # -- owner thread only ------------------------------------------------------------------

    def token_session(self, label: str, pin: str) -> _TokenSession:
        """The logged-in session on ``label``, opening it (and loading the module) if needed."""
        current = self._tokens.get(label)
        if current is not None:
            if not hmac.compare_digest(current.pin.encode(), pin.encode()):
                raise UpstreamUnavailable(
                    f"HSM token {label!r} is already logged in with a different PIN "
                    "in this process."
                )
            return current
        pin_digest = hashlib.sha256(pin.encode()).digest()
        if hmac.compare_digest(self._refused.get(label, b""), pin_digest):
            raise UpstreamUnavailable(
                f"HSM token {label!r} refused this PIN before; it is not offered again so the "
                "token does not lock it. Fix backend.pkcs11.pin_env or pin_file and restart."
            )
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.module)
            except p11e.PKCS11Error as exc:
                raise _ModuleUnusable(str(exc)) from exc
        token = self._lib.get_token(token_label=label)
        try:
            session = token.open(rw=True, user_pin=pin)
        except _PIN_REFUSED:
            # Offering a refused PIN again (every poll) would make a real HSM lock it.
            self._refused[label] = pin_digest
            raise
        try:
            mechanisms = frozenset(token.slot.get_mechanisms())
        except p11e.PKCS11Error:
            session.close()
            raise
        opened = _TokenSession(label=label, pin=pin, session=session, mechanisms=mechanisms)
        self._tokens[label] = opened
        log.info("logged in to HSM token %r", label)
        return opened

    def drop(self, label: str) -> None:
        """Forget the session on ``label`` (closing it if it still works) and its cached handles."""
        dropped = self._tokens.pop(label, None)
        if dropped is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                dropped.session.close()

    def release_unused(self) -> None:
        """Close sessions no open backend uses; finalize the module when none is left."""
        with _OWNERS_LOCK:
            unused = [label for label in self._tokens if not self.users.get(label)]
            idle = not any(self.users.values())
        for label in unused:
            self.drop(label)
            log.info("closed session on HSM token %r", label)
        if idle and self._lib is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib = None


_OWNERS: dict[str, _HsmOwner] = {}
_OWNERS_LOCK = threading.Lock()


def _owner_for(module: str, label: str) -> _HsmOwner:
    """The owner of ``module`` in this process, counting one more user of token ``label``."""
    with _OWNERS_LOCK:
        owner = _OWNERS.get(module)
        if owner is None:
            owner = _OWNERS[module] = _HsmOwner(module)
        owner.users[label] = owner.users.get(label, 0) + 1
        return owner


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


@dataclass(frozen=True)
class _KeyObjects:
    """The objects of one root key found on the token, by version."""

    key_type: str
    private: Mapping[int, pkcs11.Object]
    public: Mapping[int, pkcs11.Object]


class Pkcs11Backend:
    """Root keys on a PKCS#11 token. Construct once per process; cheap until the first call.

    The PIN is read at construction (``ConfigError`` if missing or if ``pin_file`` is open to
    other users); ``resolve_path`` makes a relative ``pin_file`` absolute. The first call (or
    :meth:`connect`) loads the module and logs in. ``call_timeout`` (seconds) bounds how long a
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
        self._owner = _owner_for(self._module, self._label)
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

        def call(ts: _TokenSession) -> NewKek:
            found = _find(ts.session, name)
            if found.key_type != "aes256":
                raise InvalidRequest(
                    f"Key {name!r} is an {found.key_type} key; only aes256 keys make data keys."
                )
            version = max(found.private)
            key = _capable(found.private[version], pkcs11.SecretKey)
            ts.aes_keys[(name, version)] = key
            random = ts.session.generate_random(8 * (_KEK_BYTES + _IV_BYTES))
            plaintext, iv = random[:_KEK_BYTES], random[_KEK_BYTES:]
            sealed = _capable(key, pkcs11.EncryptMixin).encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, _aad(name, version)),
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

        def call(ts: _TokenSession) -> bytes:
            key = ts.aes_keys.get((name, version))
            if key is None:
                key = _find_aes_version(ts.session, name, version)
                ts.aes_keys[(name, version)] = key
            plaintext = _capable(key, pkcs11.DecryptMixin).decrypt(
                sealed,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, _aad(name, version)),
            )
            if not isinstance(plaintext, bytes) or len(plaintext) != _KEK_BYTES:
                raise DecryptionFailed("wrapped KEK has the wrong length")
            return plaintext

        return await self._run("unwrap_kek", call, opening=True)

    async def key_info(self, root_key: str) -> RootKeyInfo:
        name = self._existing_name(root_key)
        return await self._run("key_info", lambda ts: self._info(name, _find(ts.session, name)))

    async def rotate(self, root_key: str) -> RootKeyInfo:
        name = self._existing_name(root_key)

        def call(ts: _TokenSession) -> RootKeyInfo:
            found = _find(ts.session, name)
            version = max(found.private) + 1
            _generate(ts, name, found.key_type, version)
            log.info("rotated HSM key %r to version %d", name, version)
            return self._info(name, _find(ts.session, name))

        return await self._run("rotate", call)

    async def create(self, root_key: str, key_type: str) -> RootKeyInfo:
        if key_type not in KEY_TYPES:
            raise InvalidRequest(
                f"Unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}."
            )
        if not _KEY_NAME.fullmatch(root_key):
            raise InvalidRequest(
                "Key names are 1 to 128 letters, digits, '_', '.' and '-', "
                "starting with a letter or digit."
            )

        def call(ts: _TokenSession) -> RootKeyInfo:
            with contextlib.suppress(PermissionDenied):
                return self._info(root_key, _find(ts.session, root_key))
            _generate(ts, root_key, key_type, 1)
            log.info("created %s HSM key %r", key_type, root_key)
            return self._info(root_key, _find(ts.session, root_key))

        return await self._run("create", call)

    async def list_keys(self) -> list[str]:
        def call(ts: _TokenSession) -> list[str]:
            names: set[str] = set()
            for object_class in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
                for obj in list(ts.session.get_objects({Attribute.CLASS: object_class})):
                    attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
                    label, object_id = attrs.get(Attribute.LABEL), attrs.get(Attribute.ID)
                    if isinstance(label, str) and isinstance(object_id, bytes):
                        parsed = _OBJECT_ID.fullmatch(object_id)
                        if parsed is not None and parsed.group(1) == label.encode():
                            names.add(label)
            return sorted(names)

        return await self._run("list_keys", call)

    async def destroy(self, root_key: str) -> None:
        name = self._existing_name(root_key)

        def call(ts: _TokenSession) -> None:
            doomed = [obj for obj, _ in _versioned_objects(ts.session, name)]
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
        with _OWNERS_LOCK:
            self._owner.users[self._label] -= 1
        released = asyncio.wrap_future(self._owner.submit(self._owner.release_unused))
        try:
            await asyncio.wait_for(released, self._call_timeout)
        except asyncio.TimeoutError:
            log.warning("HSM token %r did not release its session in time", self._label)

    # -- beyond RootKeyBackend --------------------------------------------------------------

    async def connect(self) -> None:
        """Load the module and log in now rather than at the first call, so start-up fails fast."""
        await self._run("connect", lambda ts: None)

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

        def call(ts: _TokenSession) -> tuple[int, bytes]:
            found = _find(ts.session, name)
            if found.key_type == "aes256":
                raise InvalidRequest(f"Key {name!r} is an aes256 key; it cannot sign.")
            used = max(found.private) if version is None else version
            found_key = found.private.get(used)
            if found_key is None:
                raise InvalidRequest(f"Key {name!r} has no version {used}.")
            key = _capable(found_key, pkcs11.SignMixin)
            if found.key_type == "ec-p256":
                if len(digest) > 64:
                    raise InvalidRequest("An ECDSA digest must be at most 64 bytes long.")
                return used, key.sign(digest, mechanism=Mechanism.ECDSA)
            return used, key.sign(digest, mechanism=Mechanism.EDDSA)

        return await self._run("sign", call)

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(
        self, operation: str, call: Callable[[_TokenSession], _T], *, opening: bool = False
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

    def _in_owner(self, call: Callable[[_TokenSession], _T], opening: bool) -> _T:
        """Owner thread: open the session if needed and run ``call``, once more if it was lost."""
        owner = self._owner
        with _translated(self._label, opening=opening):
            ts = owner.token_session(self._label, self._pin)
            try:
                return call(ts)
            except _SESSION_LOST as exc:
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
        if not _KEY_NAME.fullmatch(root_key):
            raise PermissionDenied()
        return root_key

    def _info(self, name: str, found: _KeyObjects) -> RootKeyInfo:
        public_keys = {
            version: _public_pem(found.key_type, obj[Attribute.EC_POINT])
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


# -- token objects (owner thread only) --------------------------------------------------------


def _aad(name: str, version: int) -> bytes:
    return f"kms-sidecar:kek:{name}:v{version}".encode()


def _object_id(name: str, version: int) -> bytes:
    return f"{name}:v{version}".encode()


def _versioned_objects(session: pkcs11.Session, name: str) -> list[tuple[pkcs11.Object, int]]:
    """Every object labelled ``name`` whose id is ``<name>:v<N>``, with its N."""
    found = []
    for obj in list(session.get_objects({Attribute.LABEL: name})):
        object_id = obj[Attribute.ID]
        parsed = _OBJECT_ID.fullmatch(object_id) if isinstance(object_id, bytes) else None
        if parsed is not None and parsed.group(1) == name.encode():
            found.append((obj, int(parsed.group(2))))
    return found


def _find(session: pkcs11.Session, name: str) -> _KeyObjects:
    """The versions of root key ``name``; ``PermissionDenied`` if there are none."""
    private: dict[int, pkcs11.Object] = {}
    public: dict[int, pkcs11.Object] = {}
    types: set[str] = set()
    for obj, version in _versioned_objects(session, name):
        if isinstance(obj, pkcs11.PublicKey):
            public[version] = obj
            continue
        key_type = _key_type(obj)
        if key_type is not None:
            private[version] = obj
            types.add(key_type)
    if not private:
        raise PermissionDenied()
    if len(types) > 1:
        raise UpstreamError(f"HSM key {name!r} has versions of different types.")
    return _KeyObjects(key_type=types.pop(), private=private, public=public)


def _find_aes_version(session: pkcs11.Session, name: str, version: int) -> pkcs11.SecretKey:
    """Version ``version`` of AES key ``name``.

    ``PermissionDenied`` if the key does not exist at all, ``DecryptionFailed`` if that version
    (or an AES key of that name) does not.
    """
    matches = list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.LABEL: name,
                Attribute.ID: _object_id(name, version),
            }
        )
    )
    if len(matches) == 1 and isinstance(matches[0], pkcs11.SecretKey):
        return matches[0]
    if len(matches) > 1:
        raise UpstreamError(f"HSM key {name!r} has more than one object for version {version}.")
    _find(session, name)  # PermissionDenied if the key itself is missing
    raise DecryptionFailed("root key version not on the token or not an AES key")


def _capable(obj: object, cls: type[_O]) -> _O:
    """``obj`` as a ``cls`` (a key class or capability mixin); ``UpstreamError`` if it is not."""
    if not isinstance(obj, cls):
        raise UpstreamError(f"An HSM key object lacks the capability {cls.__name__}.")
    return obj


def _key_type(obj: pkcs11.Object) -> str | None:
    """Our name for the type of a secret or private key object; None if it is not one of ours."""
    if isinstance(obj, pkcs11.SecretKey):
        attrs = obj.get_attributes([Attribute.KEY_TYPE, Attribute.VALUE_LEN])
        if attrs.get(Attribute.KEY_TYPE) == KeyType.AES and attrs.get(Attribute.VALUE_LEN) == 32:
            return "aes256"
        return None
    if isinstance(obj, pkcs11.PrivateKey):
        attrs = obj.get_attributes([Attribute.KEY_TYPE, Attribute.EC_PARAMS])
        params = attrs.get(Attribute.EC_PARAMS)
        if attrs.get(Attribute.KEY_TYPE) == KeyType.EC and params == _P256_PARAMS:
            return "ec-p256"
        if attrs.get(Attribute.KEY_TYPE) == KeyType.EC_EDWARDS and params in (
            _ED25519_PARAMS,
            _ED25519_PARAMS_NAMED,
        ):
            return "ed25519"
    return None


def _generate(ts: _TokenSession, name: str, key_type: str, version: int) -> None:
    """Make version ``version`` of ``name`` on the token: sensitive, never extractable."""
    object_id = _object_id(name, version)
    never_leaves = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }
    if key_type == "aes256":
        ts.session.generate_key(
            KeyType.AES,
            256,
            label=name,
            id=object_id,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template=never_leaves,
        )
        return
    if (
        key_type == "ed25519"
        and not {
            Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            Mechanism.EDDSA,
        }
        <= ts.mechanisms
    ):
        raise InvalidRequest(
            f"The pkcs11 backend does not support ed25519 on HSM token {ts.label!r} "
            "(no CKM_EC_EDWARDS_KEY_PAIR_GEN/CKM_EDDSA); use ec-p256."
        )
    ts.session.generate_keypair(
        KeyType.EC if key_type == "ec-p256" else KeyType.EC_EDWARDS,
        label=name,
        id=object_id,
        store=True,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        public_template={
            Attribute.TOKEN: True,
            Attribute.EC_PARAMS: _P256_PARAMS if key_type == "ec-p256" else _ED25519_PARAMS,
        },
        private_template=never_leaves,
    )


def _public_pem(key_type: str, ec_point: bytes) -> str:
    """The SubjectPublicKeyInfo PEM of an EC or Ed25519 public key's ``CKA_EC_POINT``."""
    if key_type == "ec-p256":
        public: ec.EllipticCurvePublicKey | Ed25519PublicKey = (
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _point(ec_point, 65))
        )
    else:
        public = Ed25519PublicKey.from_public_bytes(_point(ec_point, 32))
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _point(value: bytes, size: int) -> bytes:
    """The point inside ``CKA_EC_POINT``: DER OCTET STRING per the spec, raw on some tokens."""
    if len(value) == size:
        return value
    if len(value) == size + 2 and value[0] == 0x04 and value[1] == size:
        return value[2:]
    raise UpstreamError("The HSM returned a public key in an unexpected encoding.")
