"""Sign and verify with transit ed25519 and ecdsa-p256 keys through the sidecar (real OpenBao).

Signing is passed through: the signature is OpenBao's own ``vault:v1:…``, valid for OpenBao
itself. Verification runs in the sidecar against the keys' public keys.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config
from tests.integration.conftest import vault_sections


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def signing_keys(openbao: DevOpenBao) -> Iterator[dict[str, str]]:
    """Transit keys of each signing type, named uniquely; deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "ed": f"ed-{suffix}",
        "ec": f"ec-{suffix}",
        "derived": f"dr-{suffix}",
        "aes": f"aes-{suffix}",
    }
    client = openbao.client()
    client.secrets.transit.create_key(names["ed"], key_type="ed25519")
    client.secrets.transit.create_key(names["ec"], key_type="ecdsa-p256")
    client.secrets.transit.create_key(names["derived"], key_type="ed25519", derived=True)
    client.secrets.transit.create_key(names["aes"], key_type="aes256-gcm96")
    yield names
    for name in names.values():
        client.secrets.transit.update_key_configuration(name, deletion_allowed=True)
        client.secrets.transit.delete_key(name)


@pytest.fixture
def signer(
    openbao: DevOpenBao, signing_keys: dict[str, str], run_sidecar: Any, short_tmp: Path
) -> RunningSidecar:
    keys = {name: {} for name in signing_keys.values()}
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(short_tmp / "sig.sock", **vault_sections(openbao, keys))
    )
    return sidecar


def ok(answer: Any) -> Any:
    assert answer.status == 200, answer
    return answer.data


def sign(sidecar: RunningSidecar, key: str, message: bytes, path: str = "", **fields: Any) -> Any:
    body = {"input": b64(message), **fields}
    return ok(sidecar.request("POST", f"/v1/transit/sign/{key}{path}", body))


def verify(
    sidecar: RunningSidecar, key: str, message: bytes, signature: str, path: str = "", **fields: Any
) -> bool:
    body = {"input": b64(message), "signature": signature, **fields}
    valid = ok(sidecar.request("POST", f"/v1/transit/verify/{key}{path}", body))["valid"]
    assert isinstance(valid, bool)
    return valid


def upstream_calls(sidecar: RunningSidecar) -> dict[str, int]:
    calls: dict[str, int] = ok(sidecar.request("GET", "/v1/sidecar/status"))["backend"]["calls"]
    return calls


def bao_verifies(
    client: hvac.Client, key: str, message: bytes, signature: str, **extra: Any
) -> bool:
    answer = client.adapter.post(
        f"/v1/transit/verify/{key}", json={"input": b64(message), "signature": signature, **extra}
    )
    return bool(answer["data"]["valid"])


@pytest.mark.parametrize("kind", ["ed", "ec"])
def test_sign_passes_through_and_verify_is_local(
    signer: RunningSidecar, signing_keys: dict[str, str], openbao: DevOpenBao, kind: str
) -> None:
    key = signing_keys[kind]
    message = b"ship build 1234"
    before = upstream_calls(signer)
    signed = sign(signer, key, message)
    assert signed["signature"].startswith("vault:v1:") and signed["key_version"] == 1
    assert upstream_calls(signer).get("sign", 0) == before.get("sign", 0) + 1
    client = openbao.client()
    assert bao_verifies(client, key, message, signed["signature"])  # OpenBao's own signature

    assert verify(signer, key, message, signed["signature"]) is True
    assert verify(signer, key, b"ship build 1235", signed["signature"]) is False
    assert upstream_calls(signer).get("verify", 0) == 0, "verify must not go upstream"

    # And a signature OpenBao made directly is checked by the sidecar too.
    direct = client.adapter.post(f"/v1/transit/sign/{key}", json={"input": b64(message)})
    assert verify(signer, key, message, direct["data"]["signature"]) is True

    shown = ok(signer.request("GET", f"/v1/transit/keys/{key}"))["keys"]["1"]["public_key"]
    # as Vault shows them: PEM for ECDSA, the raw key in base64 for ed25519
    public = (
        load_pem_public_key(shown.encode())
        if kind == "ec"
        else Ed25519PublicKey.from_public_bytes(base64.b64decode(shown))
    )
    signature = base64.b64decode(signed["signature"].split(":", 2)[2])
    if kind == "ec":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, Ed25519PublicKey)
        public.verify(signature, message)


def test_ecdsa_options_match_openbao(
    signer: RunningSidecar, signing_keys: dict[str, str], openbao: DevOpenBao
) -> None:
    key, client, message = signing_keys["ec"], openbao.client(), b"options"
    jws = sign(signer, key, message, marshaling_algorithm="jws")["signature"]
    assert "=" not in jws and bao_verifies(client, key, message, jws, marshaling_algorithm="jws")
    assert verify(signer, key, message, jws, marshaling_algorithm="jws") is True
    assert verify(signer, key, message, jws) is False

    sha512 = sign(signer, key, message, "/sha2-512")["signature"]
    assert bao_verifies(client, key, message, sha512, hash_algorithm="sha2-512")
    assert verify(signer, key, message, sha512, "/sha2-512") is True
    assert verify(signer, key, message, sha512) is False

    digest = hashlib.sha256(message).digest()
    prehashed = sign(signer, key, digest, prehashed=True)["signature"]
    assert verify(signer, key, message, prehashed) is True
    assert verify(signer, key, digest, prehashed, prehashed=True) is True
    assert upstream_calls(signer).get("verify", 0) == 0


def test_jwks_of_transit_keys(signer: RunningSidecar, signing_keys: dict[str, str]) -> None:
    ed = signer.request("GET", f"/v1/sidecar/jwks/{signing_keys['ed']}")
    assert ed.status == 200, ed
    [ed_key] = ed.json["keys"]
    assert (ed_key["kty"], ed_key["crv"], ed_key["kid"]) == (
        "OKP",
        "Ed25519",
        f"{signing_keys['ed']}:v1",
    )
    ec_answer = signer.request("GET", f"/v1/sidecar/jwks/{signing_keys['ec']}")
    [ec_key] = ec_answer.json["keys"]
    assert (ec_key["kty"], ec_key["crv"], ec_key["alg"]) == ("EC", "P-256", "ES256")


def test_derived_keys_are_verified_upstream(
    signer: RunningSidecar, signing_keys: dict[str, str]
) -> None:
    key, context = signing_keys["derived"], b64(b"tenant-a")
    signed = sign(signer, key, b"m", context=context)
    assert signed["signature"].startswith("vault:v1:")
    assert verify(signer, key, b"m", signed["signature"], context=context) is True
    assert verify(signer, key, b"m", signed["signature"], context=b64(b"tenant-b")) is False
    assert upstream_calls(signer)["verify"] == 2  # no public key without a context: upstream


def test_refusals(signer: RunningSidecar, signing_keys: dict[str, str]) -> None:
    aes = signer.request("POST", f"/v1/transit/sign/{signing_keys['aes']}", {"input": b64(b"m")})
    assert (aes.status, aes.code) == (400, "invalid_request"), aes
    ed = signing_keys["ed"]
    for signature in ("sidecar:v1:AAAA", "no prefix", "vault:v7:AAAA"):
        answer = signer.request(
            "POST", f"/v1/transit/verify/{ed}", {"input": b64(b"m"), "signature": signature}
        )
        assert (answer.status, answer.code) == (400, "invalid_request"), (signature, answer)
    garbled = verify(signer, ed, b"m", "vault:v1:not-base64!")
    assert garbled is False
    unknown = signer.request("POST", "/v1/transit/sign/not-configured", {"input": b64(b"m")})
    assert (unknown.status, unknown.code) == (403, "permission_denied"), unknown


@pytest.mark.parametrize("kind", ["ec", "ed"])
def test_the_client_sdk_signs_verifies_and_reads_the_jwks(
    signer: RunningSidecar, signing_keys: dict[str, str], kind: str
) -> None:
    from sidecar.client import Client

    key = signing_keys[kind]
    with Client(signer.socket) as client:
        signature = client.sign(key, b"release 7")
        assert signature.startswith("vault:v1:")
        assert client.verify(key, b"release 7", signature) is True
        assert client.verify(key, b"release 8", signature) is False
        assert [k["kty"] for k in client.jwks(key)["keys"]] == ["EC" if kind == "ec" else "OKP"]
