"""Pkcs11Backend against a real SoftHSM2 token (never a mock)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sidecar.backends.base import RootKeyBackend
from sidecar.backends.pkcs11 import Pkcs11Backend
from sidecar.config import Pkcs11Config
from sidecar.errors import (
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    UpstreamUnavailable,
)
from tests.integration.hsm.conftest import PIN_ENV, TOKEN
from tests.integration.softhsm import SoftHsm

OpenBackend = Callable[..., Pkcs11Backend]


async def test_is_a_root_key_backend(backend: Pkcs11Backend) -> None:
    assert isinstance(backend, RootKeyBackend)
    assert backend.kind == "pkcs11"


async def test_aes_root_key_is_sensitive_and_never_extractable(
    backend: Pkcs11Backend, softhsm: SoftHsm, key_name: str
) -> None:
    info = await backend.create(key_name, "aes256")
    assert (info.key_type, info.latest_version, info.min_decryption_version) == ("aes256", 1, 1)
    assert info.public_keys == {}

    [root] = softhsm.inspect(TOKEN, key_name)
    assert root["class"] == "SECRET_KEY"
    assert root["id"] == f"{key_name}:v1"
    assert root["sensitive"] is True
    assert root["extractable"] is False
    assert root["never_extractable"] is True
    assert root["always_sensitive"] is True
    assert root["value_readable"] is False
    assert (root["wrap"], root["unwrap"]) == (False, False)

    again = await backend.create(key_name, "aes256")  # creating twice is a no-op
    assert again.latest_version == 1
    assert len(softhsm.inspect(TOKEN, key_name)) == 1
    assert key_name in await backend.list_keys()


async def test_kek_round_trip(backend: Pkcs11Backend, key_name: str) -> None:
    await backend.create(key_name, "aes256")
    kek = await backend.generate_kek(key_name)
    assert len(kek.plaintext) == 32
    assert kek.root_version == 1
    assert kek.wrapped.startswith(b"hsm:v1:")
    assert kek.plaintext not in kek.wrapped
    assert kek.plaintext.hex() not in repr(kek)
    assert await backend.unwrap_kek(key_name, kek.wrapped) == kek.plaintext
    other = await backend.generate_kek(key_name)
    assert other.plaintext != kek.plaintext
    assert other.wrapped[7:19] != kek.wrapped[7:19]  # a fresh IV each time


async def test_tampered_or_foreign_wrapped_kek_does_not_open(
    backend: Pkcs11Backend, key_name: str
) -> None:
    await backend.create(key_name, "aes256")
    await backend.create(key_name + "-other", "aes256")
    kek = await backend.generate_kek(key_name)
    wrapped = kek.wrapped
    flipped = [
        wrapped[:i] + bytes([wrapped[i] ^ 1]) + wrapped[i + 1 :] for i in (7, 20, len(wrapped) - 1)
    ]
    bad = [
        *flipped,  # IV, ciphertext, tag
        wrapped[:-1],
        wrapped + b"\x00",
        b"hsm:v2:" + wrapped[7:],  # a version that does not exist
        b"hsm:v01:" + wrapped[7:],
        b"vault:v1:abc",
        b"",
    ]
    for candidate in bad:
        with pytest.raises(DecryptionFailed):
            await backend.unwrap_kek(key_name, candidate)
    with pytest.raises(DecryptionFailed):  # AAD binds the key name
        await backend.unwrap_kek(key_name + "-other", wrapped)
    # The failures left the session usable.
    assert await backend.unwrap_kek(key_name, wrapped) == kek.plaintext
    assert backend.status()["state"] == "ok"


async def test_rotate_adds_a_version_and_old_keks_still_open(
    backend: Pkcs11Backend, softhsm: SoftHsm, key_name: str
) -> None:
    await backend.create(key_name, "aes256")
    old = await backend.generate_kek(key_name)
    info = await backend.rotate(key_name)
    assert (info.latest_version, info.min_decryption_version) == (2, 1)
    new = await backend.generate_kek(key_name)
    assert new.root_version == 2
    assert new.wrapped.startswith(b"hsm:v2:")
    assert await backend.unwrap_kek(key_name, old.wrapped) == old.plaintext
    assert await backend.unwrap_kek(key_name, new.wrapped) == new.plaintext
    ids = sorted(obj["id"] for obj in softhsm.inspect(TOKEN, key_name))
    assert ids == [f"{key_name}:v1", f"{key_name}:v2"]


async def test_64_concurrent_generate_and_unwrap_calls(
    backend: Pkcs11Backend, key_name: str
) -> None:
    await backend.create(key_name, "aes256")
    seeds = await asyncio.gather(*(backend.generate_kek(key_name) for _ in range(32)))
    unwrapped, fresh = await asyncio.gather(
        asyncio.gather(*(backend.unwrap_kek(key_name, kek.wrapped) for kek in seeds)),
        asyncio.gather(*(backend.generate_kek(key_name) for _ in range(32))),
    )
    assert unwrapped == [kek.plaintext for kek in seeds]
    assert len({kek.plaintext for kek in fresh}) == 32
    assert backend.status()["state"] == "ok"


async def test_a_restarted_backend_opens_keks_made_before(
    open_backend: OpenBackend, key_name: str
) -> None:
    first = open_backend()
    await first.create(key_name, "aes256")
    keks = [await first.generate_kek(key_name) for _ in range(3)]
    await first.close()
    with pytest.raises(UpstreamUnavailable):
        await first.generate_kek(key_name)

    second = open_backend()  # the module was finalized; this logs in afresh
    for kek in keks:
        assert await second.unwrap_kek(key_name, kek.wrapped) == kek.plaintext


async def test_ec_p256_key_signs_digests_verifiable_with_its_public_key(
    backend: Pkcs11Backend, softhsm: SoftHsm, key_name: str
) -> None:
    info = await backend.create(key_name, "ec-p256")
    assert info.key_type == "ec-p256"
    message = b"pay 10 EUR to alice"
    digest = hashlib.sha256(message).digest()

    version, signature = await backend.sign(key_name, None, digest)
    assert version == 1 and len(signature) == 64
    public = load_pem_public_key(info.public_keys[1].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(der, message + b"!", ec.ECDSA(hashes.SHA256()))

    objects = {obj["class"]: obj for obj in softhsm.inspect(TOKEN, key_name)}
    private = objects["PRIVATE_KEY"]
    assert (private["sensitive"], private["extractable"], private["sign"]) == (True, False, True)
    assert private["value_readable"] is False
    assert objects["PUBLIC_KEY"]["verify"] is True

    with pytest.raises(InvalidRequest):
        await backend.generate_kek(key_name)
    with pytest.raises(DecryptionFailed):
        await backend.unwrap_kek(key_name, b"hsm:v1:" + bytes(60))

    rotated = await backend.rotate(key_name)
    assert rotated.latest_version == 2
    assert rotated.public_keys[1] == info.public_keys[1]
    assert rotated.public_keys[2] != info.public_keys[1]
    version, signature = await backend.sign(key_name, 1, digest)
    assert version == 1
    public.verify(
        utils.encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        ),
        message,
        ec.ECDSA(hashes.SHA256()),
    )
    with pytest.raises(InvalidRequest):
        await backend.sign(key_name, 3, digest)


async def test_ed25519_signs_or_is_refused_clearly(backend: Pkcs11Backend, key_name: str) -> None:
    try:
        info = await backend.create(key_name, "ed25519")
    except InvalidRequest as exc:
        assert "does not support ed25519" in exc.message
        return
    assert info.key_type == "ed25519"
    public = load_pem_public_key(info.public_keys[1].encode())
    assert isinstance(public, Ed25519PublicKey)
    version, signature = await backend.sign(key_name, None, b"a message")
    assert version == 1
    public.verify(signature, b"a message")


async def test_aes_key_cannot_sign(backend: Pkcs11Backend, key_name: str) -> None:
    await backend.create(key_name, "aes256")
    with pytest.raises(InvalidRequest):
        await backend.sign(key_name, None, bytes(32))


async def test_wrong_pin_is_unavailable_and_never_shown(
    open_backend: OpenBackend,
    hsm_config: Pkcs11Config,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_pin = "wrong-" + os.urandom(6).hex()
    monkeypatch.setenv("KMS_SIDECAR_TEST_WRONG_PIN", wrong_pin)
    wrong = open_backend(
        Pkcs11Config(
            module=hsm_config.module, token_label=TOKEN, pin_env="KMS_SIDECAR_TEST_WRONG_PIN"
        )
    )
    caplog.set_level(logging.DEBUG)
    for _ in range(2):  # the second attempt is refused without offering the PIN again
        with pytest.raises(UpstreamUnavailable) as caught:
            await wrong.list_keys()
        assert TOKEN in caught.value.message
        for text in (caught.value.message, repr(caught.value), str(caught.value.__cause__)):
            assert wrong_pin not in text
    status = wrong.status()
    assert status["state"] == "unavailable"
    for text in (json.dumps(status), repr(wrong), caplog.text):
        assert wrong_pin not in text
    await wrong.close()

    right = open_backend()  # the right PIN still works in the same process
    await right.list_keys()
    assert right.status()["state"] == "ok"


async def test_missing_token_is_unavailable(
    open_backend: OpenBackend, hsm_config: Pkcs11Config
) -> None:
    missing = open_backend(
        Pkcs11Config(module=hsm_config.module, token_label="no-such-token", pin_env=PIN_ENV)
    )
    with pytest.raises(UpstreamUnavailable, match="no-such-token"):
        await missing.list_keys()


async def test_pin_file_must_be_private(
    open_backend: OpenBackend, softhsm: SoftHsm, tmp_path: Path
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o644)
    config = Pkcs11Config(token_label=TOKEN, pin_env="", pin_file=str(pin_file))
    with pytest.raises(ConfigError, match="pin_file") as caught:
        Pkcs11Backend(config)
    assert softhsm.pin not in str(caught.value)
    pin_file.chmod(0o600)
    backend = open_backend(config)
    await backend.list_keys()
    assert backend.status()["state"] == "ok"


def test_missing_pin_env_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_SIDECAR_TEST_NO_PIN", raising=False)
    with pytest.raises(ConfigError, match="KMS_SIDECAR_TEST_NO_PIN"):
        Pkcs11Backend(Pkcs11Config(pin_env="KMS_SIDECAR_TEST_NO_PIN"))


async def test_destroy_removes_every_version(
    backend: Pkcs11Backend, softhsm: SoftHsm, key_name: str
) -> None:
    ec_name = key_name + "-ec"
    await backend.create(key_name, "aes256")
    await backend.create(ec_name, "ec-p256")
    kek = await backend.generate_kek(key_name)
    await backend.rotate(key_name)
    await backend.rotate(key_name)
    await backend.rotate(ec_name)
    assert len(softhsm.inspect(TOKEN, key_name)) == 3
    assert len(softhsm.inspect(TOKEN, ec_name)) == 4  # two key pairs

    await backend.destroy(key_name)
    await backend.destroy(ec_name)
    assert softhsm.inspect(TOKEN, key_name) == []
    assert softhsm.inspect(TOKEN, ec_name) == []
    assert key_name not in await backend.list_keys()
    with pytest.raises(PermissionDenied):
        await backend.key_info(key_name)
    with pytest.raises(PermissionDenied):  # crypto-shredded: its KEKs are gone for good
        await backend.unwrap_kek(key_name, kek.wrapped)
    with pytest.raises(PermissionDenied):
        await backend.destroy(key_name)


async def test_unknown_keys_are_permission_denied(backend: Pkcs11Backend, key_name: str) -> None:
    for name in (key_name, "../etc", "", "x" * 200):
        with pytest.raises(PermissionDenied):
            await backend.key_info(name)
        with pytest.raises(PermissionDenied):
            await backend.generate_kek(name)
        with pytest.raises(PermissionDenied):
            await backend.rotate(name)
    with pytest.raises(PermissionDenied):
        await backend.unwrap_kek(key_name, b"hsm:v1:" + bytes(60))
    with pytest.raises(InvalidRequest):
        await backend.create("../etc", "aes256")
    with pytest.raises(InvalidRequest):
        await backend.create(key_name, "rsa-4096")


async def test_a_lost_session_is_reopened(backend: Pkcs11Backend, key_name: str) -> None:
    await backend.create(key_name, "aes256")
    kek = await backend.generate_kek(key_name)
    # Close the session behind the backend's back (what a token reset or HSM failover does),
    # on the owner thread like every other PKCS#11 call.
    owner = backend._owner
    await asyncio.wrap_future(owner.submit(lambda: owner._tokens[TOKEN].session.close()))
    assert await backend.unwrap_kek(key_name, kek.wrapped) == kek.plaintext
    assert backend.status()["state"] == "ok"


async def test_status_names_the_token_and_never_the_pin(
    backend: Pkcs11Backend, softhsm: SoftHsm
) -> None:
    assert backend.status()["state"] == "unknown"
    await backend.list_keys()
    status = backend.status()
    assert status["kind"] == "pkcs11"
    assert status["token"] == TOKEN
    assert status["state"] == "ok"
    assert softhsm.pin not in json.dumps(status)
    assert softhsm.pin not in repr(backend)
