"""The integration tests' fixtures: a real OpenBao dev server (see tests/conftest.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.devserver import DevOpenBao
from tests.conftest import (
    LOOPS,
    TOKEN_ENV,
    ProcessSidecar,
    RunningSidecar,
    module_tmp,
    shipped_sidecar,
    sidecar_config,
    vault_sections,
)
from tests.pki import TlsFiles, make_tls_files
from tests.security.test_jwt import public_jwk

__all__ = ["TOKEN_ENV", "module_tmp", "vault_sections"]


@pytest.fixture
def sidecar(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path) -> RunningSidecar:
    """One sidecar on the shared OpenBao with keys ``payments`` and ``default``."""
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(short_tmp / "s.sock", **vault_sections(openbao))
    )
    return sidecar


SPIFFE_PROD = "spiffe://example.org/ns/prod/sa/*"
#: Keys of :func:`shipped` besides payments and default: an ed25519 key to sign with, and a key
#: of its own to rotate (so no other test sees its versions move).
SHIPPED_KEYS = {"signer": "ed25519", "spinning": "aes256-gcm96"}


JWT_ISSUER = "https://issuer.test"
JWT_AUDIENCE = "kms-sidecar"


def shipped_policy(uid: int) -> str:
    """The policy of :func:`shipped`: the test user, prod SPIFFE IDs over mTLS and JWTs of
    :data:`JWT_ISSUER` may do all."""
    return (
        f'[[allow]]\nname = "test-user"\nwhen.unix_uid = [{uid}]\nkeys = ["*"]\n'
        'operations = ["*"]\n\n'
        f'[[allow]]\nname = "mesh-prod"\nwhen.spiffe_id = "{SPIFFE_PROD}"\nkeys = ["*"]\n'
        'operations = ["*"]\n\n'
        f'[[allow]]\nname = "issuer-apps"\nwhen.jwt_iss = "{JWT_ISSUER}"\nkeys = ["*"]\n'
        'operations = ["*"]\n'
    )


@dataclass
class Shipped:
    """A shipped sidecar process with both listeners, and the PKI to call its mTLS one."""

    sidecar: ProcessSidecar
    tls: TlsFiles
    loop: str
    #: A client certificate whose SPIFFE ID the policy allows.
    client: tuple[Path, Path]
    #: Signs the JWTs the sidecar accepts (ES256, kid ``ec-1``).
    jwt_key: ec.EllipticCurvePrivateKey

    def jwt(self, subject: str) -> str:
        """A valid JWT for ``subject`` from :data:`JWT_ISSUER`, for five minutes."""
        now = int(time.time())
        claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": subject, "iat": now}
        claims["exp"] = now + 300
        return jwt.encode(claims, self.jwt_key, algorithm="ES256", headers={"kid": "ec-1"})

    @property
    def socket(self) -> str:
        return self.sidecar.socket

    @property
    def tcp_url(self) -> str:
        return f"https://127.0.0.1:{self.tls.port}"


@pytest.fixture(scope="module", params=LOOPS)
def shipped(
    request: pytest.FixtureRequest, openbao: DevOpenBao, module_tmp: Path
) -> Iterator[Shipped]:
    """The installed ``kms-sidecar run`` on each event loop, with a world-connectable Unix socket
    (mode 0666) and the mTLS listener, on the shared OpenBao (keys payments and default, and
    :data:`SHIPPED_KEYS`)."""
    loop: str = request.param
    for name, key_type in SHIPPED_KEYS.items():
        openbao.client().secrets.transit.create_key(name, key_type=key_type)
    directory = module_tmp / loop
    directory.mkdir()
    tls = make_tls_files(directory)
    (directory / "policies").mkdir()
    (directory / "policies" / "test.toml").write_text(shipped_policy(os.getuid()))
    # The socket in a directory every user may enter (as /run/kms-sidecar is); keys stay private.
    sockets = module_tmp / f"run-{loop}"
    sockets.mkdir(mode=0o755)
    module_tmp.chmod(0o711)
    sock = sockets / "s.sock"
    jwt_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [public_jwk(jwt_key, "ec-1", "ES256")]}
    (directory / "jwks.json").write_text(json.dumps(jwks))
    config = directory / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\nsocket_mode = "0666"\n'
        f'tcp_address = "127.0.0.1:{tls.port}"\ntls_cert_file = "server.crt"\n'
        'tls_key_file = "server.key"\ntls_client_ca_file = "ca.crt"\n'
        f'[auth]\njwt_issuer = "{JWT_ISSUER}"\njwt_audiences = ["{JWT_AUDIENCE}"]\n'
        'jwt_jwks_file = "jwks.json"\n'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
        "[keys.payments]\n[keys.default]\n" + "".join(f"[keys.{name}]\n" for name in SHIPPED_KEYS)
    )
    client = tls.client("api", spiffe_id="spiffe://example.org/ns/prod/sa/api")
    with shipped_sidecar(config, sock, loop=loop) as sidecar:
        yield Shipped(sidecar, tls, loop, client, jwt_key)
