"""The one thread making every PKCS#11 call of the process, and the translation of its errors.

SoftHSM under python-pkcs11 is not thread-safe (python-pkcs11 calls ``C_Initialize`` without
``CKF_OS_LOCKING_OK``; concurrent calls crash or fail). So every PKCS#11 call in the process, for
every backend instance using the same module, runs on one dedicated thread (:class:`HsmOwner`),
which also holds the single logged-in session per token. When the last backend using a module
closes, the owner closes its sessions and finalizes the library; the next one re-initializes it
(SoftHSM re-reads ``SOFTHSM2_CONF`` and rescans its tokens then).

python-pkcs11 exceptions are translated in :func:`translated` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Mechanism

from sidecar.errors import (
    DecryptionFailed,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Errors after which the session (or a cached object handle) is no longer usable: drop the
# session, open and log in again, and retry the call once.
SESSION_LOST: tuple[type[p11e.PKCS11Error], ...] = (
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
    *SESSION_LOST,
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


class ModuleUnusable(Exception):
    """The PKCS#11 module could not be loaded or initialised."""


@contextlib.contextmanager
def translated(token_label: str, *, opening: bool = False) -> Iterator[None]:
    """Map python-pkcs11 exceptions to the sidecar's, in one place.

    ``opening`` marks a call that decrypts caller-supplied bytes: data errors there mean the
    bytes do not open (``DecryptionFailed``). Messages name the token, never the PIN. Anything
    that is not a PKCS#11 error propagates untouched.
    """
    try:
        yield
    except ModuleUnusable as exc:
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
class TokenSession:
    """The one logged-in session this process holds on a token. Owner thread only."""

    label: str
    pin: str = field(repr=False)
    session: pkcs11.Session
    mechanisms: frozenset[Mechanism]
    #: (key name, version) → the AES secret key object, so unwraps skip the object search.
    aes_keys: dict[tuple[str, int], pkcs11.SecretKey] = field(default_factory=dict)


class HsmOwner:
    """The one thread that makes every PKCS#11 call to one module in this process.

    Shared by every backend using the module (see :func:`owner_for`); it never goes away, so
    there is never a second thread calling the library.
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11-owner")
        #: How many open backends use each token label (guarded by ``OWNERS_LOCK``).
        self.users: dict[str, int] = {}
        # Owner thread only:
        self._lib: Any = None
        self._tokens: dict[str, TokenSession] = {}
        #: Token label → SHA-256 of a PIN the token refused; never offered again (lockout).
        self._refused: dict[str, bytes] = {}

    def submit(self, fn: Callable[[], _T]) -> Future[_T]:
        """Run ``fn`` on the owner thread."""
        return self._executor.submit(fn)

    # -- owner thread only ------------------------------------------------------------------

    def token_session(self, label: str, pin: str) -> TokenSession:
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
                raise ModuleUnusable(str(exc)) from exc
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
        opened = TokenSession(label=label, pin=pin, session=session, mechanisms=mechanisms)
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
        with OWNERS_LOCK:
            unused = [label for label in self._tokens if not self.users.get(label)]
            idle = not any(self.users.values())
        for label in unused:
            self.drop(label)
            log.info("closed session on HSM token %r", label)
        if idle and self._lib is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib = None


_OWNERS: dict[str, HsmOwner] = {}
OWNERS_LOCK = threading.Lock()


def owner_for(module: str, label: str) -> HsmOwner:
    """The owner of ``module`` in this process, counting one more user of token ``label``."""
    with OWNERS_LOCK:
        owner = _OWNERS.get(module)
        if owner is None:
            owner = _OWNERS[module] = HsmOwner(module)
        owner.users[label] = owner.users.get(label, 0) + 1
        return owner
