"""JWT verification (DESIGN §4): pyjwt against configured keys or a JWKS, with a fixed
allow-list of asymmetric algorithms.

Every refusal is :class:`~sidecar.errors.Unauthenticated` whose message says what is wrong with the
token ("token expired", "token audience not accepted", "token signed with an unknown key id", ...)
and never contains the token or any part of it.

Rules, none of which can be switched off:

- Only ``auth.jwt_algorithms`` verify, and only asymmetric ones (RS*, PS*, ES*, EdDSA): ``none``
  and HMAC (HS*) are refused at start, so a public key can never serve as an HMAC secret.
  A key verifies only the algorithms its type fits (an RSA key never checks an ES256 token), and
  a JWK that states ``alg`` only that algorithm. Symmetric (``oct``) JWKs are ignored.
- ``exp``, ``iss`` and ``aud`` are required; ``iss`` must equal ``auth.jwt_issuer`` when set;
  ``aud`` must name one of ``auth.jwt_audiences``; ``nbf`` and ``iat`` are honoured when present.
  ``auth.jwt_leeway`` applies to every time check. Time checks use the injected clock, so pyjwt
  verifies the signature, issuer and audience and this module checks the times.
- Keys: ``jwt_public_keys`` (PEM text or paths; public keys or certificates), ``jwt_jwks_file``
  and ``jwt_jwks_url``, all combined. The URL is fetched on first use (a failure is retried after
  :data:`RETRY_AFTER_FAILURE`, not on every request). The file and URL are read again when a
  token names an unknown ``kid``, at most once per :data:`REFETCH_INTERVAL` counted from the last
  read; the URL is also refreshed in the background once its keys are older than
  :data:`JWKS_MAX_AGE`. When a key disappears, cached tokens are forgotten.
- Verified tokens are cached (LRU, keyed by the token's SHA-256) until they expire, so a busy
  caller pays for the signature check once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt.types import Options

from sidecar.config import AuthConfig, Config
from sidecar.errors import ConfigError, Unauthenticated
from sidecar.identity import JwtClaims

log = logging.getLogger(__name__)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""The algorithms ``auth.jwt_algorithms`` may list."""

REFETCH_INTERVAL: Final = 30.0
"""Seconds between two key reloads triggered by unknown key ids."""

RETRY_AFTER_FAILURE: Final = 5.0
"""Seconds before a failed JWKS fetch is tried again."""

JWKS_MAX_AGE: Final = 300.0
"""Seconds after which JWKS URL keys are refreshed in the background."""

MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_JWKS_BYTES: Final = 1024 * 1024
MIN_RSA_BITS: Final = 2048

_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_REQUIRED_CLAIMS: Final = ["exp", "iss", "aud"]
_PRINTABLE_ALG = re.compile(r"^[A-Za-z0-9_-]{1,16}$")

NOT_ACCEPTED: Final = (
    "this sidecar does not accept tokens; call it without one (unset BAO_TOKEN/VAULT_TOKEN and "
    "remove ~/.vault-token: local callers are known by their Unix peer credentials), or "
    "configure auth.jwt_* to accept JWTs"
)


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key a token may be signed with.

    ``kid`` is ``None`` for PEM keys and kid-less JWKs, which are tried for any token whose
    algorithm they fit. ``alg`` is the JWK's stated algorithm, if any.
    """

    key: PublicKey
    kid: str | None = None
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a token signed with ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        key = self.key
        if alg.startswith(("RS", "PS")):
            return isinstance(key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
        if alg == "EdDSA":
            return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False


# --- key loading ------------------------------------------------------------------------------


def keys_from_jwks(document: Any, *, origin: str) -> list[VerificationKey]:
    """The usable signing keys of a JWKS document (``{"keys": [...]}``).

    Unusable members (symmetric, encryption-only, unsupported, too short) are skipped with a
    log line. Raises ``ValueError`` if the document is not a JWKS.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{origin} is not a JWKS (expected an object with a 'keys' list)")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(document["keys"]):
        why = _unusable_jwk(jwk)
        if why is None:
            try:
                public = _public(jwt.PyJWK(jwk).key)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                why = f"it could not be read ({type(exc).__name__})"
            else:
                why = _weak(public)
                if why is None:
                    kid, alg = jwk.get("kid"), jwk.get("alg")
                    keys.append(
                        VerificationKey(
                            public,
                            kid if isinstance(kid, str) else None,
                            alg if isinstance(alg, str) else None,
                        )
                    )
                    continue
        log.warning("ignoring key %d of %s: %s", index, origin, why)
    return keys


def _unusable_jwk(jwk: Any) -> str | None:
    if not isinstance(jwk, Mapping):
        return "it is not an object"
    if jwk.get("kty") == "oct":
        return "symmetric keys are never accepted"
    if jwk.get("use") not in (None, "sig"):
        return "it is not a signing key"
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return "its algorithm is not an accepted asymmetric algorithm"
    return None


def _public(key: Any) -> PublicKey:
    # A JWK may carry private parameters; only the public half is ever used.
    if hasattr(key, "public_key"):
        key = key.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):  # fmt: skip
        raise ValueError("not an RSA, EC or EdDSA public key")
    return key


def _weak(key: PublicKey) -> str | None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"RSA keys shorter than {MIN_RSA_BITS} bits are refused"
    return None


_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL
)  # fmt: skip


def keys_from_pem(text: str, *, origin: str) -> list[VerificationKey]:
    """Public keys from PEM text holding public keys and/or certificates.

    Raises ``ValueError`` for private keys, unreadable blocks, unsupported or weak keys, or text
    with no PEM block.
    """
    keys: list[VerificationKey] = []
    for match in _PEM_BLOCK.finditer(text):
        label = match.group(1)
        block = match.group(0).encode()
        if "PRIVATE" in label:
            raise ValueError(f"{origin} holds a private key; configure the public key instead")
        try:
            if label == "CERTIFICATE":
                loaded: Any = x509.load_pem_x509_certificate(block).public_key()
            else:
                loaded = load_pem_public_key(block)
            public = _public(loaded)
        except ValueError as exc:
            raise ValueError(f"{origin}: cannot read the {label} block: {exc}") from None
        weak = _weak(public)
        if weak:
            raise ValueError(f"{origin}: {weak}")
        keys.append(VerificationKey(public))
    if not keys:
        raise ValueError(f"{origin} holds no PEM public key or certificate")
    return keys


def _fetch_url(url: str, timeout: float) -> bytes:
    """GET ``url`` (blocking; run it in a thread). Raises ``OSError``/``ValueError``."""
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s) at start
        url, headers={"Accept": "application/json", "User-Agent": "kms-sidecar"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return body


# --- the verifier -----------------------------------------------------------------------------


class JwtVerifier:
    """Verifies bearer JWTs for one :class:`~sidecar.config.AuthConfig`.

    Build it at start (bad configuration raises ``ConfigError`` naming the ``auth.*`` key) and call
    :meth:`verify` from async code; JWKS URL fetches run in a thread. ``clock`` (seconds since the
    epoch) is injectable; so is ``fetch`` (URL → body bytes, blocking) for tests. Call
    :meth:`aclose` at shutdown to stop a background refresh.
    """

    def __init__(
        self,
        auth: AuthConfig,
        *,
        base_dir: str = ".",
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        fetch_timeout: float = 5.0,
        fetch: Callable[[str, float], bytes] = _fetch_url,
    ) -> None:
        self.enabled = auth.jwt_enabled
        self._base_dir = base_dir
        self._clock = clock
        self._cache_size = cache_size
        self._fetch_timeout = fetch_timeout
        self._fetch = fetch
        self._issuer = auth.jwt_issuer or None
        self._audiences = list(auth.jwt_audiences)
        self._leeway = auth.jwt_leeway
        self._algorithms = tuple(auth.jwt_algorithms)
        self._jwks_file = self._path(auth.jwt_jwks_file) if auth.jwt_jwks_file else ""
        self._jwks_url = auth.jwt_jwks_url
        self._static: list[VerificationKey] = []
        self._file_keys: list[VerificationKey] = []
        self._url_keys: list[VerificationKey] = []
        self._keys: list[VerificationKey] = []
        self._cache: OrderedDict[bytes, tuple[JwtClaims, float]] = OrderedDict()
        self._lock = asyncio.Lock()
        self._last_reload: float | None = None  # last key reload: first fetch or unknown kid
        self._url_fetched_at: float | None = None
        self._url_failed_at: float | None = None
        self._background: asyncio.Task[None] | None = None
        #: Counters for ``/v1/sidecar/status`` and tests.
        self.stats = {"verified": 0, "cache_hits": 0, "refused": 0, "jwks_fetches": 0}
        if not self.enabled:
            return
        self._validate(auth)
        for index, entry in enumerate(auth.jwt_public_keys):
            where = f"auth.jwt_public_keys[{index}]"
            try:
                if "-----BEGIN" in entry:
                    text = entry
                else:
                    text = Path(self._path(entry)).read_text(encoding="ascii")
                self._static.extend(keys_from_pem(text, origin=where))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if self._jwks_file:
            try:
                self._file_keys = self._read_jwks_file()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.jwt_jwks_file: {exc}") from None
            if not self._file_keys:
                raise ConfigError("auth.jwt_jwks_file: the JWKS holds no usable signing key")
        self._rebuild()

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> JwtVerifier:
        """A verifier for ``config.auth``, with relative paths resolved against the config file."""
        return cls(config.auth, base_dir=config.base_dir, **kwargs)

    def _path(self, path: str) -> str:
        return str(Path(self._base_dir, os.path.expanduser(path)))

    def _validate(self, auth: AuthConfig) -> None:
        if not auth.jwt_algorithms:
            raise ConfigError("auth.jwt_algorithms: list at least one algorithm, such as 'RS256'")
        for index, alg in enumerate(auth.jwt_algorithms):
            if alg not in ASYMMETRIC_ALGORITHMS:
                why = (
                    "unsigned tokens are never accepted"
                    if alg.lower() == "none"
                    else "HMAC would let anyone holding the public key forge tokens"
                    if alg.upper().startswith("HS")
                    else "it is not a supported asymmetric algorithm"
                )
                raise ConfigError(
                    f"auth.jwt_algorithms[{index}]: {alg!r} is not allowed ({why}); use "
                    f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
                )
        if not auth.jwt_audiences:
            raise ConfigError(
                "auth.jwt_audiences: list the audiences this sidecar accepts; every token must "
                "carry one of them in 'aud'"
            )
        if auth.jwt_jwks_url:
            parsed = urllib.parse.urlsplit(auth.jwt_jwks_url)
            if parsed.scheme not in ("https", "http") or not parsed.netloc:
                raise ConfigError("auth.jwt_jwks_url: expected an https:// URL")
            if parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
                log.warning("auth.jwt_jwks_url uses plain http; the signing keys can be tampered")

    # --- keys ---------------------------------------------------------------------------------

    def _read_jwks_file(self) -> list[VerificationKey]:
        with open(self._jwks_file, "rb") as fh:
            body = fh.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        return keys_from_jwks(json.loads(body), origin=self._jwks_file)

    def _rebuild(self) -> None:
        before = {(k.kid, _fingerprint(k)) for k in self._keys}
        self._keys = [*self._static, *self._file_keys, *self._url_keys]
        after = {(k.kid, _fingerprint(k)) for k in self._keys}
        if before - after:
            # A key was withdrawn: tokens it signed must be checked again.
            self._cache.clear()

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """The keys currently trusted."""
        return tuple(self._keys)

    async def refresh_keys(self, *, now: float | None = None) -> None:
        """Read the JWKS file and fetch the JWKS URL now (for start-up and SIGHUP).

        A failure keeps the keys already held and is logged.
        """
        async with self._lock:
            await self._reload(self._clock() if now is None else now)

    async def _reload(self, now: float) -> None:
        if self._jwks_file:
            try:
                self._file_keys = await asyncio.to_thread(self._read_jwks_file)
            except (OSError, ValueError) as exc:
                log.warning("cannot re-read %s, keeping its old keys: %s", self._jwks_file, exc)
        if self._jwks_url:
            await self._fetch_jwks(now)
        self._rebuild()

    async def _fetch_jwks(self, now: float) -> None:
        self.stats["jwks_fetches"] += 1
        try:
            body = await asyncio.to_thread(self._fetch, self._jwks_url, self._fetch_timeout)
            keys = keys_from_jwks(json.loads(body), origin=self._jwks_url)
        except (OSError, ValueError) as exc:
            self._url_failed_at = now
            log.warning("cannot fetch the JWKS from %s: %s", self._jwks_url, exc)
            return
        if not keys:
            self._url_failed_at = now
            log.warning("the JWKS at %s holds no usable signing key", self._jwks_url)
            return
        self._url_keys = keys
        self._url_fetched_at = now
        self._url_failed_at = None
        log.info("fetched %d JWT signing keys from %s", len(keys), self._jwks_url)

    async def _ensure_url_keys(self, now: float) -> None:
        """Fetch the JWKS URL if it never succeeded (retrying failures every few seconds)."""
        if not self._jwks_url or self._url_fetched_at is not None:
            return
        async with self._lock:
            if self._url_fetched_at is not None:
                return
            if self._url_failed_at is not None and now - self._url_failed_at < RETRY_AFTER_FAILURE:
                return
            await self._fetch_jwks(now)
            self._last_reload = now
            self._rebuild()

    async def _reload_for_unknown_kid(self, kid: str, now: float) -> None:
        if not (self._jwks_file or self._jwks_url):
            return
        if self._jwks_url and self._url_fetched_at is None:
            return  # never fetched yet: _ensure_url_keys retries on its own schedule
        async with self._lock:
            if any(k.kid == kid for k in self._keys):
                return  # another request already reloaded
            if self._last_reload is not None and now - self._last_reload < REFETCH_INTERVAL:
                return
            self._last_reload = now
            await self._reload(now)

    def _maybe_refresh_in_background(self, now: float) -> None:
        fetched = self._url_fetched_at
        if fetched is None or now - fetched < JWKS_MAX_AGE:
            return
        if self._background is not None and not self._background.done():
            return
        self._background = asyncio.create_task(self._refresh_stale(now))

    async def _refresh_stale(self, now: float) -> None:
        async with self._lock:
            if self._url_fetched_at is not None and now - self._url_fetched_at < JWKS_MAX_AGE:
                return
            await self._fetch_jwks(now)
            if self._url_fetched_at is None or self._url_fetched_at < now:
                self._url_fetched_at = now  # failed: try again after another max age
            self._rebuild()

    async def aclose(self) -> None:
        """Stop a background JWKS refresh, if one is running."""
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- verification -------------------------------------------------------------------------

    async def verify(self, token: str, *, now: float | None = None) -> JwtClaims:
        """The claims of a valid ``token``; raises ``Unauthenticated`` saying why it is not.

        ``now`` is seconds since the epoch (default: the clock given at construction).
        """
        if not self.enabled:
            raise Unauthenticated(NOT_ACCEPTED)
        now = self._clock() if now is None else now
        try:
            return await self._verify(token, now)
        except Unauthenticated:
            self.stats["refused"] += 1
            raise

    async def _verify(self, token: str, now: float) -> JwtClaims:
        if not isinstance(token, str) or not token:
            raise Unauthenticated("the token is empty")
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            claims, expires = cached
            if now < expires + self._leeway:
                self._cache.move_to_end(digest)
                self.stats["cache_hits"] += 1
                return claims
            del self._cache[digest]

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg is None or (isinstance(alg, str) and alg.lower() == "none"):
            raise Unauthenticated("algorithm 'none' is not allowed; tokens must be signed")
        if not isinstance(alg, str) or alg not in self._algorithms:
            shown = repr(alg) if isinstance(alg, str) and _PRINTABLE_ALG.match(alg) else "it"
            raise Unauthenticated(
                f"token algorithm {shown} is not accepted (accepted: {', '.join(self._algorithms)})"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("the token is not a well-formed JWT (kid is not a string)")

        await self._ensure_url_keys(now)
        self._maybe_refresh_in_background(now)
        if kid is not None and not any(k.kid == kid for k in self._keys):
            await self._reload_for_unknown_kid(kid, now)
        candidates = [
            k for k in self._keys if k.fits(alg) and (kid is None or k.kid in (kid, None))
        ]
        if not candidates:
            if self._jwks_url and self._url_fetched_at is None:
                raise Unauthenticated(
                    "the sidecar could not fetch the JWT signing keys (JWKS); retry later"
                )
            if kid is not None:
                raise Unauthenticated("token signed with an unknown key id")
            raise Unauthenticated(f"no trusted key can verify a {alg} token")

        payload = self._decode(token, alg, candidates)
        expires = self._check_times(payload, now)
        issuer = payload["iss"]
        if not isinstance(issuer, str):
            raise Unauthenticated("token issuer not accepted ('iss' is not a string)")
        subject = payload.get("sub")
        claims = JwtClaims(
            issuer=issuer,
            subject=subject if isinstance(subject, str) else "",
            claims=MappingProxyType(payload),
        )
        self.stats["verified"] += 1
        self._cache[digest] = (claims, expires)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def _decode(
        self, token: str, alg: str, candidates: Iterable[VerificationKey]
    ) -> dict[str, Any]:
        options: Options = {
            "require": list(_REQUIRED_CLAIMS),
            "verify_signature": True,
            "verify_aud": True,
            "verify_iss": self._issuer is not None,
            # Times are checked by _check_times against the injected clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "enforce_minimum_key_length": True,
        }
        for candidate in candidates:
            try:
                return jwt.decode(
                    token,
                    key=candidate.key,
                    algorithms=[alg],
                    options=options,
                    audience=self._audiences,
                    issuer=self._issuer,
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthenticated(f"token has no {exc.claim!r} claim") from None
            except jwt.InvalidAudienceError:
                raise Unauthenticated("token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise Unauthenticated("token issuer not accepted") from None
            except jwt.InvalidAlgorithmError:
                raise Unauthenticated("token algorithm not accepted") from None
            except jwt.DecodeError:
                raise Unauthenticated("the token is not a well-formed JWT") from None
            except jwt.PyJWTError as exc:
                raise Unauthenticated(f"the token is invalid ({type(exc).__name__})") from None
        raise Unauthenticated("token signature does not verify with any trusted key")

    def _check_times(self, payload: Mapping[str, Any], now: float) -> float:
        """Check exp, nbf and iat against ``now`` with leeway; returns ``exp``."""
        leeway = self._leeway
        exp = _number(payload, "exp")
        if exp is None:
            raise Unauthenticated("token has no 'exp' claim")
        if exp <= now - leeway:
            raise Unauthenticated("token expired; get a fresh one")
        nbf = _number(payload, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise Unauthenticated("token not yet valid (its 'nbf' is in the future)")
        iat = _number(payload, "iat")
        if iat is not None and iat > now + leeway:
            raise Unauthenticated("token not yet valid (its 'iat' is in the future)")
        return exp


def _number(payload: Mapping[str, Any], claim: str) -> float | None:
    if claim not in payload:
        return None
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"token claim {claim!r} is not a number of seconds")
    return float(value)


def _fingerprint(key: VerificationKey) -> bytes:
    return key.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
