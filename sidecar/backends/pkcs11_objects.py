"""How root keys are laid out as PKCS#11 token objects: finding, typing, making them.

Every version of a root key is its own token object, labelled with the key's name and carrying
``CKA_ID = b"<name>:v<N>"``: an AES-256 secret key for ``aes256``, a key pair (both halves share
label and id) for ``ec-p256`` and ``ed25519``. Secret and private keys are made ``SENSITIVE`` and
never ``EXTRACTABLE``. Every function here runs on the owner thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from sidecar.backends.pkcs11_owner import TokenSession
from sidecar.errors import DecryptionFailed, InvalidRequest, PermissionDenied, UpstreamError

_O = TypeVar("_O")

OBJECT_ID: Final = re.compile(rb"(.+):v([1-9][0-9]{0,8})", re.DOTALL)
"""``CKA_ID`` of a root key version: the key's name, ``:v``, the version."""

#: DER of the named-curve parameters we make and recognise.
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
_ED25519_PARAMS = bytes.fromhex("06032b6570")  # OID 1.3.101.112
_ED25519_PARAMS_NAMED = b"\x13\x0cedwards25519"  # PrintableString, PKCS#11 3.0 style


@dataclass(frozen=True)
class KeyObjects:
    """The objects of one root key found on the token, by version."""

    key_type: str
    private: Mapping[int, pkcs11.Object]
    public: Mapping[int, pkcs11.Object]


def kek_aad(name: str, version: int) -> bytes:
    """The AES-GCM AAD binding a wrapped KEK to its root key and version."""
    return f"kms-sidecar:kek:{name}:v{version}".encode()


def object_id(name: str, version: int) -> bytes:
    """``CKA_ID`` of version ``version`` of ``name``."""
    return f"{name}:v{version}".encode()


def versioned_objects(session: pkcs11.Session, name: str) -> list[tuple[pkcs11.Object, int]]:
    """Every object labelled ``name`` whose id is ``<name>:v<N>``, with its N."""
    found = []
    for obj in list(session.get_objects({Attribute.LABEL: name})):
        object_id = obj[Attribute.ID]
        parsed = OBJECT_ID.fullmatch(object_id) if isinstance(object_id, bytes) else None
        if parsed is not None and parsed.group(1) == name.encode():
            found.append((obj, int(parsed.group(2))))
    return found


def find(session: pkcs11.Session, name: str) -> KeyObjects:
    """The versions of root key ``name``; ``PermissionDenied`` if there are none."""
    private: dict[int, pkcs11.Object] = {}
    public: dict[int, pkcs11.Object] = {}
    types: set[str] = set()
    for obj, version in versioned_objects(session, name):
        if isinstance(obj, pkcs11.PublicKey):
            public[version] = obj
            continue
        key_type = key_type_of(obj)
        if key_type is not None:
            private[version] = obj
            types.add(key_type)
    if not private:
        raise PermissionDenied()
    if len(types) > 1:
        raise UpstreamError(f"HSM key {name!r} has versions of different types.")
    return KeyObjects(key_type=types.pop(), private=private, public=public)


def find_aes_version(session: pkcs11.Session, name: str, version: int) -> pkcs11.SecretKey:
    """Version ``version`` of AES key ``name``.

    ``PermissionDenied`` if the key does not exist at all, ``DecryptionFailed`` if that version
    (or an AES key of that name) does not.
    """
    matches = list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.LABEL: name,
                Attribute.ID: object_id(name, version),
            }
        )
    )
    if len(matches) == 1 and isinstance(matches[0], pkcs11.SecretKey):
        return matches[0]
    if len(matches) > 1:
        raise UpstreamError(f"HSM key {name!r} has more than one object for version {version}.")
    find(session, name)  # PermissionDenied if the key itself is missing
    raise DecryptionFailed("root key version not on the token or not an AES key")


def capable(obj: object, cls: type[_O]) -> _O:
    """``obj`` as a ``cls`` (a key class or capability mixin); ``UpstreamError`` if it is not."""
    if not isinstance(obj, cls):
        raise UpstreamError(f"An HSM key object lacks the capability {cls.__name__}.")
    return obj


def key_type_of(obj: pkcs11.Object) -> str | None:
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


def generate(ts: TokenSession, name: str, key_type: str, version: int) -> None:
    """Make version ``version`` of ``name`` on the token: sensitive, never extractable."""
    cka_id = object_id(name, version)
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
            id=cka_id,
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
        id=cka_id,
        store=True,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        public_template={
            Attribute.TOKEN: True,
            Attribute.EC_PARAMS: _P256_PARAMS if key_type == "ec-p256" else _ED25519_PARAMS,
        },
        private_template=never_leaves,
    )


def public_pem(key_type: str, ec_point: bytes) -> str:
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
