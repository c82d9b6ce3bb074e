"""Hostile and honest JWTs against the verifier: real tokens minted with real keys, JWKS from a
file, from PEM keys and from a real loopback HTTP server."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.auth import JwtVerifier
from sidecar.auth.jwks import JWKS_MAX_AGE
from sidecar.config import AuthConfig
from sidecar.errors import ConfigError, Unauthenticated

NOW = 1_700_000_000.0
ISSUER = "https://issuer.test"
AUDIENCE = "kms-sidecar"


@dataclass
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    ed_key: ed25519.Ed25519PrivateKey
    stranger: rsa.RSAPrivateKey  # never trusted


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        ed_key=ed25519.Ed25519PrivateKey.generate(),
        stranger=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    assert isinstance(jwk, dict)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def jwks(keys: Keys) -> dict[str, Any]:
    return {
        "keys": [
            public_jwk(keys.rsa_key, "rsa-1", "RS256"),
            public_jwk(keys.ec_key, "ec-1", "ES256"),
            public_jwk(keys.ed_key, "ed-1", "EdDSA"),
        ]
    }


def pem(private: Any) -> str:
    data: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def claims(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "system:serviceaccount:prod:api",
        "aud": [AUDIENCE, "other"],
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 300,
        "kubernetes.io": {"namespace": "prod"},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def mint(private: Any, alg: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), private, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def config(**overrides: Any) -> AuthConfig:
    values: dict[str, Any] = {
        "jwt_issuer": ISSUER,
        "jwt_audiences": (AUDIENCE,),
        "jwt_leeway": 30.0,
    }
    values.update(overrides)
    return AuthConfig(**values)


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(keys)), encoding="utf-8")
    return path


@pytest.fixture
def verifier(jwks_file: Path) -> JwtVerifier:
    return JwtVerifier(config(jwt_jwks_file=str(jwks_file)), clock=lambda: NOW)


# --- refused ----------------------------------------------------------------------------------


def refused_tokens(keys: Keys) -> list[tuple[str, str, str]]:
    rsa_pem = pem(keys.rsa_key).encode()
    return [
        (
            "alg none",
            hand_made({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(), None),
            "algorithm 'none' is not allowed",
        ),
        (
            "alg None, another spelling",
            hand_made({"alg": "None", "kid": "rsa-1"}, claims(), None),
            "algorithm 'none' is not allowed",
        ),
        (
            "no alg at all",
            hand_made({"typ": "JWT", "kid": "rsa-1"}, claims(), None),
            "algorithm 'none' is not allowed",
        ),
        (
            "HS256 keyed with the RSA public key PEM",
            hand_made({"alg": "HS256", "kid": "rsa-1"}, claims(), rsa_pem),
            "token algorithm 'HS256' is not accepted",
        ),
        (
            "an algorithm not on the list",
            mint(keys.rsa_key, "PS256", "rsa-1"),
            "token algorithm 'PS256' is not accepted",
        ),
        ("expired", mint(keys.rsa_key, "RS256", "rsa-1", exp=int(NOW) - 31), "token expired"),
        (
            "not yet valid",
            mint(keys.rsa_key, "RS256", "rsa-1", nbf=int(NOW) + 31),
            "token not yet valid",
        ),
        (
            "issued in the future",
            mint(keys.rsa_key, "RS256", "rsa-1", iat=int(NOW) + 3600),
            "token not yet valid",
        ),
        (
            "wrong issuer",
            mint(keys.rsa_key, "RS256", "rsa-1", iss="https://evil.test"),
            "token issuer not accepted",
        ),
        (
            "wrong audience",
            mint(keys.rsa_key, "RS256", "rsa-1", aud="someone-else"),
            "token audience not accepted",
        ),
        ("no exp", mint(keys.rsa_key, "RS256", "rsa-1", exp=None), "token has no 'exp' claim"),
        ("no iss", mint(keys.rsa_key, "RS256", "rsa-1", iss=None), "token has no 'iss' claim"),
        ("no aud", mint(keys.rsa_key, "RS256", "rsa-1", aud=None), "token has no 'aud' claim"),
        (
            "exp is not a number",
            mint(keys.rsa_key, "RS256", "rsa-1", exp="tomorrow"),
            "'exp' is not a number",
        ),
        (
            "unknown kid",
            mint(keys.rsa_key, "RS256", "rsa-404"),
            "token signed with an unknown key id",
        ),
        (
            "valid signature by an unknown key, under a known kid",
            mint(keys.stranger, "RS256", "rsa-1"),
            "token signature does not verify with any trusted key",
        ),
        (
            "valid signature by an unknown key, without kid",
            mint(keys.stranger, "RS256", None),
            "token signature does not verify with any trusted key",
        ),
        (
            "ES256 header on the RSA key's kid",
            mint(keys.ec_key, "ES256", "rsa-1"),
            "token signed with an unknown key id",
        ),
        (
            "tampered payload",
            ".".join(
                [
                    mint(keys.rsa_key, "RS256", "rsa-1").split(".")[0],
                    b64(json.dumps(claims(sub="admin")).encode()),
                    mint(keys.rsa_key, "RS256", "rsa-1").split(".")[2],
                ]
            ),
            "token signature does not verify",
        ),
        ("garbage", "this-is-not-a-jwt", "not a well-formed JWT"),
        ("three dots of garbage", "a.b.c", "not a well-formed JWT"),
        ("empty", "", "the token is empty"),
        ("huge", "a" * 20_000, "longer than"),
    ]


async def test_every_hostile_token_is_refused_with_its_reason(
    verifier: JwtVerifier, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, token, reason in refused_tokens(keys):
        with pytest.raises(Unauthenticated) as raised:
            await verifier.verify(token)
        message = raised.value.message
        assert reason in message, f"{name}: {message}"
        # No token text (nor any segment of it) in the message or the logs.
        for part in (p for p in token.split(".") if len(p) > 8):
            assert part not in message, name
            assert part not in caplog.text, name
    assert verifier.stats["verified"] == 0


async def test_leeway_accepts_a_token_just_expired(verifier: JwtVerifier, keys: Keys) -> None:
    token = mint(keys.rsa_key, "RS256", "rsa-1", exp=int(NOW) - 29, nbf=int(NOW) + 29)
    assert (await verifier.verify(token)).subject == "system:serviceaccount:prod:api"


async def test_hs256_with_the_public_pem_is_refused_when_keys_are_pems(keys: Keys) -> None:
    verifier = JwtVerifier(config(jwt_public_keys=(pem(keys.rsa_key),)), clock=lambda: NOW)
    for secret in (pem(keys.rsa_key).encode(), pem(keys.rsa_key).strip().encode()):
        forged = hand_made({"alg": "HS256"}, claims(), secret)
        with pytest.raises(Unauthenticated, match="'HS256' is not accepted"):
            await verifier.verify(forged)


@pytest.mark.parametrize(
    ("algorithms", "reason"),
    [
        (("RS256", "HS256"), "'HS256' is not allowed (HMAC"),
        (("none",), "'none' is not allowed (unsigned"),
        (("RS257",), "not a supported asymmetric algorithm"),
        ((), "list at least one algorithm"),
    ],
)
def test_unsafe_algorithm_lists_stop_start_up(
    jwks_file: Path, algorithms: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt_algorithms"):
        JwtVerifier(config(jwt_jwks_file=str(jwks_file), jwt_algorithms=algorithms))
    with pytest.raises(ConfigError) as raised:
        JwtVerifier(config(jwt_jwks_file=str(jwks_file), jwt_algorithms=algorithms))
    assert reason in str(raised.value)


def test_bad_key_configuration_stops_start_up(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt_audiences"):
        JwtVerifier(config(jwt_public_keys=(pem(keys.rsa_key),), jwt_audiences=()))
    private_pem = keys.rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ConfigError, match=r"auth\.jwt_public_keys\[0\]: .* private key"):
        JwtVerifier(config(jwt_public_keys=(private_pem,)))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    with pytest.raises(ConfigError, match="shorter than 2048 bits"):
        JwtVerifier(config(jwt_public_keys=(pem(weak),)))
    with pytest.raises(ConfigError, match=r"auth\.jwt_jwks_file"):
        JwtVerifier(config(jwt_jwks_file=str(tmp_path / "absent.json")))
    only_hmac = tmp_path / "oct.json"
    only_hmac.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}))
    with pytest.raises(ConfigError, match="no usable signing key"):
        JwtVerifier(config(jwt_jwks_file=str(only_hmac)))
    with pytest.raises(ConfigError, match=r"auth\.jwt_jwks_url"):
        JwtVerifier(config(jwt_jwks_url="file:///etc/passwd"))


async def test_a_sidecar_without_jwt_configuration_refuses_tokens(keys: Keys) -> None:
    verifier = JwtVerifier(AuthConfig())
    assert not verifier.enabled
    with pytest.raises(Unauthenticated, match=r"this sidecar does not accept tokens; .*BAO_TOKEN"):
        await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1"))


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "alg", "kid"), [("rsa_key", "RS256", "rsa-1"), ("ec_key", "ES256", "ec-1"),
                              ("ed_key", "EdDSA", "ed-1")]
)  # fmt: skip
async def test_accepted_from_a_jwks_file(
    verifier: JwtVerifier, keys: Keys, which: str, alg: str, kid: str
) -> None:
    token = mint(getattr(keys, which), alg, kid, tenant="acme")
    verified = await verifier.verify(token)
    assert verified.issuer == ISSUER
    assert verified.subject == "system:serviceaccount:prod:api"
    assert verified.claims["tenant"] == "acme"
    assert verified.claims["kubernetes.io"] == {"namespace": "prod"}


async def test_a_token_without_kid_is_tried_against_fitting_keys(
    verifier: JwtVerifier, keys: Keys
) -> None:
    assert (await verifier.verify(mint(keys.ec_key, "ES256", None))).issuer == ISSUER


async def test_accepted_from_pem_text_a_pem_file_and_a_certificate(
    tmp_path: Path, keys: Keys
) -> None:
    pem_file = tmp_path / "ec.pem"
    pem_file.write_text(pem(keys.ec_key), encoding="ascii")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.ed_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(keys.rsa_key, hashes.SHA256())
    )
    cert_file = tmp_path / "ed.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = JwtVerifier(
        config(jwt_public_keys=(pem(keys.rsa_key), "ec.pem", str(cert_file))),
        base_dir=str(tmp_path),
        clock=lambda: NOW,
    )
    # PEM keys have no kid, so they are tried whatever kid the issuer stamped on the token.
    assert (await verifier.verify(mint(keys.rsa_key, "RS256", "issuer-kid"))).issuer == ISSUER
    assert (await verifier.verify(mint(keys.ec_key, "ES256", None))).issuer == ISSUER
    assert (await verifier.verify(mint(keys.ed_key, "EdDSA", None))).issuer == ISSUER
    with pytest.raises(Unauthenticated, match="does not verify"):
        await verifier.verify(mint(keys.stranger, "RS256", None))


async def test_verified_tokens_are_cached_until_they_expire(
    verifier: JwtVerifier, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)  # the verifier calls jwt.decode
    token = mint(keys.rsa_key, "RS256", "rsa-1", exp=int(NOW) + 60)
    first = await verifier.verify(token)
    for _ in range(5):
        assert await verifier.verify(token, now=NOW + 10) is first
    assert decodes == 1
    assert verifier.stats["cache_hits"] == 5
    # Keyed by the token's digest, never the token itself.
    assert all(len(k) == 32 and k != token.encode() for k in verifier._cache)
    # Past exp plus leeway the cached entry no longer answers.
    with pytest.raises(Unauthenticated, match="token expired"):
        await verifier.verify(token, now=NOW + 91)


async def test_the_cache_is_bounded(jwks_file: Path, keys: Keys) -> None:
    verifier = JwtVerifier(config(jwt_jwks_file=str(jwks_file)), clock=lambda: NOW, cache_size=3)
    for i in range(10):
        await verifier.verify(mint(keys.ec_key, "ES256", "ec-1", jti=f"t{i}"))
    assert len(verifier._cache) == 3


# --- JWKS over HTTP ---------------------------------------------------------------------------


@dataclass
class JwksEndpoint:
    url: str
    document: dict[str, Any]
    fetches: int = 0
    status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def jwks_endpoint(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksEndpoint]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    endpoint = JwksEndpoint(url="", document={"keys": [public_jwk(keys.rsa_key, "rsa-1", "RS256")]})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with endpoint.lock:
                endpoint.fetches += 1
                body = json.dumps(endpoint.document).encode()
                status = endpoint.status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/openid/v1/jwks"
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_jwks_url_is_fetched_once_and_refetched_on_unknown_kid_at_most_every_30s(
    jwks_endpoint: JwksEndpoint, keys: Keys
) -> None:
    verifier = JwtVerifier(config(jwt_jwks_url=jwks_endpoint.url), clock=lambda: NOW)
    try:
        assert (await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1"))).issuer == ISSUER
        assert jwks_endpoint.fetches == 1
        await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1", jti="another"))
        assert jwks_endpoint.fetches == 1  # keys are cached

        # An unknown kid right after the first fetch does not fetch again (30 s since the last).
        with pytest.raises(Unauthenticated, match="unknown key id"):
            await verifier.verify(mint(keys.ec_key, "ES256", "ec-new"), now=NOW + 29)
        assert jwks_endpoint.fetches == 1
        # Later it fetches once; the key is still not published.
        with pytest.raises(Unauthenticated, match="unknown key id"):
            await verifier.verify(mint(keys.ec_key, "ES256", "ec-new"), now=NOW + 31)
        assert jwks_endpoint.fetches == 2
        # The issuer rotates in the new key; within 30 s of the last refetch nothing is fetched.
        jwks_endpoint.document = {
            "keys": [
                public_jwk(keys.rsa_key, "rsa-1", "RS256"),
                public_jwk(keys.ec_key, "ec-new", "ES256"),
            ]
        }
        for offset in (32.0, 45.0, 60.0):
            with pytest.raises(Unauthenticated, match="unknown key id"):
                await verifier.verify(mint(keys.ec_key, "ES256", "ec-new"), now=NOW + offset)
        assert jwks_endpoint.fetches == 2
        # 30 s after the last refetch the unknown kid triggers one fetch, which finds it.
        token = mint(keys.ec_key, "ES256", "ec-new")
        assert (await verifier.verify(token, now=NOW + 62)).issuer == ISSUER
        assert jwks_endpoint.fetches == 3
        assert (await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1", jti="x"))).issuer
        assert jwks_endpoint.fetches == 3
    finally:
        await verifier.aclose()


async def test_a_withdrawn_key_stops_verifying_after_the_next_refresh(
    jwks_endpoint: JwksEndpoint, keys: Keys
) -> None:
    verifier = JwtVerifier(config(jwt_jwks_url=jwks_endpoint.url), clock=lambda: NOW)
    token = mint(keys.rsa_key, "RS256", "rsa-1", exp=int(NOW) + 3600)
    await verifier.verify(token)
    jwks_endpoint.document = {"keys": [public_jwk(keys.ec_key, "ec-2", "ES256")]}
    await verifier.refresh_keys(now=NOW + 60)
    assert jwks_endpoint.fetches == 2
    with pytest.raises(Unauthenticated, match="unknown key id"):
        await verifier.verify(token, now=NOW + 61)  # not answered from the cache


async def test_an_unreachable_jwks_url_refuses_with_a_retryable_reason(
    jwks_endpoint: JwksEndpoint, keys: Keys
) -> None:
    jwks_endpoint.status = 503
    verifier = JwtVerifier(config(jwt_jwks_url=jwks_endpoint.url), clock=lambda: NOW)
    with pytest.raises(Unauthenticated, match="could not fetch the JWT signing keys"):
        await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1"))
    with pytest.raises(Unauthenticated, match="could not fetch"):
        await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1"), now=NOW + 1)
    assert jwks_endpoint.fetches == 1  # failures are retried after a pause, not per request
    jwks_endpoint.status = 200
    assert (await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1"), now=NOW + 6)).issuer
    assert jwks_endpoint.fetches == 2


async def test_stale_jwks_keys_are_refreshed_in_the_background(
    jwks_endpoint: JwksEndpoint, keys: Keys
) -> None:
    verifier = JwtVerifier(config(jwt_jwks_url=jwks_endpoint.url), clock=lambda: NOW)
    try:
        token = mint(keys.rsa_key, "RS256", "rsa-1", exp=int(NOW) + 3600)
        await verifier.verify(token)
        later = NOW + JWKS_MAX_AGE + 1
        # The request is answered with the keys at hand; the refresh does not hold it up.
        await verifier.verify(mint(keys.rsa_key, "RS256", "rsa-1", jti="y"), now=later)
        background = verifier.sources._background
        assert background is not None
        await background
        assert jwks_endpoint.fetches == 2
    finally:
        await verifier.aclose()
