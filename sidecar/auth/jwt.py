"""JWT verification: pyjwt against configured keys or a JWKS, with a fixed
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
  and ``jwt_jwks_url``, all combined; how they are read is :mod:`sidecar.auth.jwt_keys`, when
  they are read again :mod:`sidecar.auth.jwks`. When a key disappears, cached tokens are
  forgotten.
- Verified tokens are cached (LRU, keyed by the token's SHA-256) until they expire, so a busy
  caller pays for the signature check once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import jwt
from jwt.types import Options

from sidecar.auth.jwks import Fetch, JwtKeySources, cluster_fetcher, fetch_url
from sidecar.auth.jwt_keys import ASYMMETRIC_ALGORITHMS, VerificationKey, keys_from_pem
from sidecar.config import AuthConfig
from sidecar.errors import ConfigError, Unauthenticated
from sidecar.identity import JwtClaims

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES: Final = 16 * 1024

_REQUIRED_CLAIMS: Final = ["exp", "iss", "aud"]
_PRINTABLE_ALG = re.compile(r"^[A-Za-z0-9_-]{1,16}$")

NOT_ACCEPTED: Final = (
    "this sidecar does not accept tokens; call it without one (unset BAO_TOKEN/VAULT_TOKEN and "
    "remove ~/.vault-token: local callers are known by their Unix peer credentials), or "
    "configure auth.jwt_* to accept JWTs"
)


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
        fetch: Fetch = fetch_url,
    ) -> None:
        self.enabled = auth.jwt_enabled
        self._base_dir = base_dir
        self._clock = clock
        self._cache_size = cache_size
        self._issuer = auth.jwt_issuer or None
        self._audiences = list(auth.jwt_audiences)
        self._leeway = auth.jwt_leeway
        self._algorithms = tuple(auth.jwt_algorithms)
        self._cache: OrderedDict[bytes, tuple[JwtClaims, float]] = OrderedDict()
        self._counts = {"verified": 0, "cache_hits": 0, "refused": 0}
        self.sources = JwtKeySources()
        if not self.enabled:
            return
        self._validate(auth)
        static: list[VerificationKey] = []
        for index, entry in enumerate(auth.jwt_public_keys):
            where = f"auth.jwt_public_keys[{index}]"
            try:
                if "-----BEGIN" in entry:
                    text = entry
                else:
                    text = Path(self._path(entry)).read_text(encoding="ascii")
                static.extend(keys_from_pem(text, origin=where))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if fetch is fetch_url and (auth.jwt_jwks_ca_file or auth.jwt_jwks_token_file):
            fetch = self._cluster_fetcher(auth)
        self.sources = JwtKeySources(
            static=static,
            jwks_file=self._path(auth.jwt_jwks_file) if auth.jwt_jwks_file else "",
            jwks_url=auth.jwt_jwks_url,
            fetch=fetch,
            fetch_timeout=fetch_timeout,
            on_withdrawn=self._cache.clear,
        )
        if auth.jwt_jwks_file:
            try:
                usable = self.sources.load_file()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.jwt_jwks_file: {exc}") from None
            if not usable:
                raise ConfigError("auth.jwt_jwks_file: the JWKS holds no usable signing key")

    @property
    def stats(self) -> dict[str, int]:
        """Counters for ``/v1/sidecar/status`` and tests: tokens verified, answered from the
        cache and refused, and JWKS fetches."""
        return {**self._counts, "jwks_fetches": self.sources.fetches}

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
            if auth.jwt_jwks_token_file and parsed.scheme != "https":
                raise ConfigError(
                    "auth.jwt_jwks_token_file: the token is sent only to an https:// jwt_jwks_url"
                )
        for name in ("jwt_jwks_ca_file", "jwt_jwks_token_file"):
            if getattr(auth, name) and not auth.jwt_jwks_url:
                raise ConfigError(f"auth.{name}: only used with auth.jwt_jwks_url, which is empty")

    def _cluster_fetcher(self, auth: AuthConfig) -> Fetch:
        """The JWKS fetch for a cluster's own issuer: its CA and a token, both checked now."""
        token_file = self._path(auth.jwt_jwks_token_file) if auth.jwt_jwks_token_file else ""
        if token_file and not os.access(token_file, os.R_OK):
            raise ConfigError(f"auth.jwt_jwks_token_file: cannot read {token_file}")
        ca_file = self._path(auth.jwt_jwks_ca_file) if auth.jwt_jwks_ca_file else ""
        try:
            return cluster_fetcher(ca_file, token_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"auth.jwt_jwks_ca_file: cannot use {ca_file}: {exc}") from None

    # --- keys ---------------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """The keys currently trusted."""
        return self.sources.keys

    async def refresh_keys(self, *, now: float | None = None) -> None:
        """Read the JWKS file and fetch the JWKS URL now (for start-up and SIGHUP).

        A failure keeps the keys already held and is logged.
        """
        await self.sources.refresh(self._clock() if now is None else now)

    async def aclose(self) -> None:
        """Stop a background JWKS refresh, if one is running."""
        await self.sources.aclose()

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
            self._counts["refused"] += 1
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
                self._counts["cache_hits"] += 1
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

        sources = self.sources
        await sources.ensure_url_keys(now)
        sources.refresh_if_stale(now)
        if kid is not None and not sources.has(kid):
            await sources.reload_for_unknown_kid(kid, now)
        candidates = [
            k for k in sources.keys if k.fits(alg) and (kid is None or k.kid in (kid, None))
        ]
        if not candidates:
            if sources.waiting_for_url:
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
        self._counts["verified"] += 1
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
