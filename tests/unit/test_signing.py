"""The Signer over fake backends with real keys: encodings, local verification, the cache."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.backends.base import RootKeyInfo
from sidecar.backends.memory import MemoryBackend
from sidecar.errors import InvalidRequest
from sidecar.keys.signing import (
    DigestSigner,
    Signer,
    SignOptions,
    UpstreamSigner,
    load_public_key,
    public_jwk,
)


def pem(private: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> str:
    public = private.public_key()
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


class FakeHsm:
    """Signs digests like the PKCS#11 backend: raw r || s, versions that rotate."""

    kind = "fake-hsm"

    def __init__(self, key_type: str = "ec-p256") -> None:
        self.key_type = key_type
        self.versions: dict[int, Any] = {}
        self.min_decryption_version = 1
        self.reads = 0
        self.rotate()

    def rotate(self) -> None:
        make = ec.generate_private_key if self.key_type == "ec-p256" else None
        self.versions[len(self.versions) + 1] = (
            make(ec.SECP256R1()) if make else Ed25519PrivateKey.generate()
        )

    async def key_info(self, root_key: str) -> RootKeyInfo:
        self.reads += 1
        return RootKeyInfo(
            name=root_key,
            key_type=self.key_type,
            latest_version=max(self.versions),
            min_decryption_version=self.min_decryption_version,
            public_keys={v: pem(k) for v, k in self.versions.items()},
        )

    async def sign(self, root_key: str, version: int | None, digest: bytes) -> tuple[int, bytes]:
        used = version or max(self.versions)
        key = self.versions[used]
        if self.key_type == "ed25519":
            return used, key.sign(digest)
        # CKM_ECDSA signs a digest of any length; cryptography wants to be told which hash.
        algorithm = {28: hashes.SHA224(), 32: hashes.SHA256(), 48: hashes.SHA384()}[len(digest)]
        der = key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))
        r, s = utils.decode_dss_signature(der)
        return used, r.to_bytes(32, "big") + s.to_bytes(32, "big")


class FakeTransit:
    """Signs and verifies upstream like transit; counts what went upstream."""

    kind = "fake-vault"

    def __init__(self, key_type: str, public_key: str) -> None:
        self.key_type = key_type
        self.public_key = public_key
        self.upstream: list[str] = []

    async def key_info(self, root_key: str) -> RootKeyInfo:
        return RootKeyInfo(root_key, self.key_type, 1, 1, {1: self.public_key})

    async def sign_upstream(self, root_key: str, data: bytes, **options: Any) -> tuple[str, int]:
        self.upstream.append("sign")
        return "vault:v1:c2lnbmF0dXJl", 1

    async def verify_upstream(
        self, root_key: str, data: bytes, signature: str, **options: Any
    ) -> bool:
        self.upstream.append("verify")
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def signer_over(backend: Any, **options: Any) -> Signer:
    return Signer(backend, lambda name: f"root-{name}", **options)


async def test_the_fakes_are_what_the_signer_expects() -> None:
    assert isinstance(FakeHsm(), DigestSigner)
    assert isinstance(FakeTransit("ed25519", ""), UpstreamSigner)


async def test_asn1_is_der_in_base64_and_jws_is_raw_in_unpadded_base64url() -> None:
    hsm = FakeHsm()
    signer = signer_over(hsm)
    public = hsm.versions[1].public_key()
    message = b"a message"

    asn1 = await signer.sign("k", message, SignOptions())
    assert asn1.key_version == 1 and asn1.signature.startswith("sidecar:v1:")
    der = base64.b64decode(asn1.signature.split(":", 2)[2], validate=True)
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))

    jws = await signer.sign("k", message, SignOptions(marshaling_algorithm="jws"))
    body = jws.signature.split(":", 2)[2]
    assert len(body) == 86 and not set(body) & set("+/=")
    raw = base64.urlsafe_b64decode(body + "==")
    der = utils.encode_dss_signature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    )
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))

    assert await signer.verify("k", message, asn1.signature, SignOptions())
    assert await signer.verify("k", message, jws.signature, SignOptions(marshaling_algorithm="jws"))
    assert not await signer.verify("k", message, jws.signature, SignOptions())
    assert not await signer.verify("k", b"another", asn1.signature, SignOptions())
    assert not await signer.verify("k", message, "sidecar:v1:!!!", SignOptions())
    assert not await signer.verify("k", message, "sidecar:v1:" + "A" * 88, SignOptions())


async def test_verification_is_cached_and_a_newer_version_is_read_once() -> None:
    hsm = FakeHsm()
    signer = signer_over(hsm)
    first = await signer.sign("k", b"m", SignOptions())
    for _ in range(50):
        assert await signer.verify("k", b"m", first.signature, SignOptions())
    assert hsm.reads == 1

    hsm.rotate()  # behind the signer's back, as another sidecar or the keys command does
    second = await signer.sign("k", b"m", SignOptions())
    assert second.key_version == 2
    assert await signer.verify("k", b"m", second.signature, SignOptions())
    assert await signer.verify("k", b"m", first.signature, SignOptions())
    assert hsm.reads == 2


async def test_made_up_versions_cost_at_most_one_read_per_interval() -> None:
    hsm = FakeHsm()
    signer = signer_over(hsm, refresh_interval=0.05)
    good = (await signer.sign("k", b"m", SignOptions())).signature
    made_up = "sidecar:v9:" + good.split(":", 2)[2]
    for _ in range(3):
        with pytest.raises(InvalidRequest, match="does not exist yet"):
            await signer.verify("k", b"m", made_up, SignOptions())
    assert hsm.reads <= 4  # the first read, then at most one per 0.05 s


async def test_metadata_is_read_again_after_its_ttl_and_retired_versions_are_refused() -> None:
    hsm, clock = FakeHsm(), Clock()
    signer = signer_over(hsm, info_ttl=30.0, now=clock)
    old = (await signer.sign("k", b"m", SignOptions())).signature
    hsm.rotate()
    hsm.min_decryption_version = 2
    assert await signer.verify("k", b"m", old, SignOptions())  # cached: not yet known
    clock.now += 31
    with pytest.raises(InvalidRequest, match="below its min_decryption_version"):
        await signer.verify("k", b"m", old, SignOptions())
    assert hsm.reads == 2


async def test_prehashed_digests_must_have_the_hash_length() -> None:
    signer = signer_over(FakeHsm())
    digest = hashes.Hash(hashes.SHA384())
    digest.update(b"m")
    options = SignOptions(hash_algorithm="sha2-384", prehashed=True)
    signed = await signer.sign("k", digest.finalize(), options)
    assert await signer.verify("k", b"m", signed.signature, SignOptions(hash_algorithm="sha2-384"))
    with pytest.raises(InvalidRequest, match="48 bytes"):
        await signer.sign("k", b"short", options)


async def test_ed25519_signs_the_message_and_ignores_the_hash() -> None:
    hsm = FakeHsm("ed25519")
    signer = signer_over(hsm)
    signed = await signer.sign("k", b"m", SignOptions(hash_algorithm="sha3-512"))
    hsm.versions[1].public_key().verify(base64.b64decode(signed.signature[11:]), b"m")
    assert await signer.verify("k", b"m", signed.signature, SignOptions())
    [jwk] = (await signer.jwks("k"))["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("OKP", "Ed25519", "k:v1")


def test_options_refuse_what_is_not_supported() -> None:
    for bad in (
        {"hash_algorithm": "sha1"},
        {"hash_algorithm": "none"},
        {"marshaling_algorithm": "der"},
        {"key_version": 0},
    ):
        with pytest.raises(InvalidRequest):
            SignOptions(**bad)


async def test_transit_signatures_are_verified_locally_when_the_key_allows() -> None:
    ed = Ed25519PrivateKey.generate()
    raw_public = base64.b64encode(
        ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()
    transit = FakeTransit("ed25519", raw_public)  # transit shows ed25519 keys as base64
    signer = signer_over(transit)
    signature = "vault:v1:" + base64.b64encode(ed.sign(b"m")).decode()
    assert await signer.verify("k", b"m", signature, SignOptions())
    assert not await signer.verify("k", b"x", signature, SignOptions())
    assert transit.upstream == []
    # A derived key's context, or prehashed Ed25519, can only be checked upstream.
    assert await signer.verify("k", b"m", signature, SignOptions(context=b"c"))
    assert await signer.verify("k", b"m", signature, SignOptions(prehashed=True))
    assert transit.upstream == ["verify", "verify"]
    assert (await signer.sign("k", b"m", SignOptions())).signature.startswith("vault:v1:")
    with pytest.raises(InvalidRequest, match="makes 'vault:' signatures"):
        await signer.verify("k", b"m", "sidecar:v1:AAAA", SignOptions())


async def test_other_transit_key_types_are_verified_upstream() -> None:
    p384 = pem(ec.generate_private_key(ec.SECP384R1()))
    transit = FakeTransit("ecdsa-p384", p384)
    signer = signer_over(transit)
    assert await signer.verify("k", b"m", "vault:v1:AAAA", SignOptions())
    assert transit.upstream == ["verify"]


async def test_a_backend_without_signing_says_so() -> None:
    signer = Signer(MemoryBackend({"k": "ec-p256"}), lambda name: name)
    with pytest.raises(InvalidRequest, match="memory backend cannot sign"):
        await signer.sign("k", b"m", SignOptions())
    aes = Signer(MemoryBackend({"k": "aes256"}), lambda name: name)
    with pytest.raises(InvalidRequest, match="cannot sign"):
        await aes.sign("k", b"m", SignOptions())
    with pytest.raises(InvalidRequest, match="no public keys"):
        await aes.jwks("k")


def test_public_keys_parse_and_convert_to_jwks_pyjwt_accepts() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = load_public_key(pem(private), "ec-p256")
    assert public is not None
    jwk = public_jwk(public, kid="k:v1")
    assert set(jwk) == {"kty", "crv", "x", "y", "alg", "use", "kid"}
    token = jwt.encode({"sub": "a"}, private, algorithm="ES256", headers={"kid": "k:v1"})
    assert jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"]) == {"sub": "a"}

    rsa_pem = pem(rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    assert load_public_key(rsa_pem, "rsa-2048") is None
    assert load_public_key(pem(ec.generate_private_key(ec.SECP384R1())), "ecdsa-p384") is None
    assert load_public_key("", "ed25519") is None
    assert load_public_key("not base64", "ed25519") is None
