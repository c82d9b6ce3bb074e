"""What a configuration names outside itself, and whether this host has it.

``kms-sidecar check-config`` validates a file where it is written, which is often not where it
runs: the policy directory, the token file or the PIN variable belong to the target host. So it
lists every file, directory, environment variable and group the file names (:func:`references`)
and reports which are missing here, without failing for them unless asked (``--strict``).
Start-up itself checks each of them where it is used, and stops naming the key.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass
from typing import Literal

from sidecar.config import Config

Kind = Literal["file", "directory", "variable", "group"]


@dataclass(frozen=True, slots=True)
class Reference:
    """One thing the configuration names: ``key`` (dotted), what it is, and if it is here."""

    key: str
    kind: Kind
    #: The path (resolved against the config file's directory), variable or group name.
    value: str
    #: Whether start-up fails without it (``False``: it only warns or falls back).
    required: bool
    #: ``""`` when present on this host, else why not (``no such file``).
    missing: str

    @property
    def present(self) -> bool:
        return not self.missing


def _file(key: str, path: str, *, required: bool = True) -> Reference:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return Reference(key, "file", path, required, (exc.strerror or str(exc)).lower())
    return Reference(key, "file", path, required, "")


def _directory(key: str, path: str, *, required: bool = True) -> Reference:
    missing = "" if os.path.isdir(path) else "no such directory"
    return Reference(key, "directory", path, required, missing)


def _variable(key: str, name: str, *, required: bool = True) -> Reference:
    missing = "" if os.environ.get(name, "").strip() else "not set"
    return Reference(key, "variable", name, required, missing)


def references(config: Config) -> list[Reference]:
    """Every file, directory, variable and group ``config`` names that start-up will use."""
    path = config.resolve_path
    server, auth, backend = config.server, config.auth, config.backend
    found: list[Reference] = []
    # The socket's directory is created at start when missing, so it is not listed.
    if server.socket_group:
        try:
            grp.getgrnam(server.socket_group)
            missing = ""
        except KeyError:
            missing = "no such group"
        found.append(Reference("server.socket_group", "group", server.socket_group, True, missing))
    if server.tcp_address:
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            found.append(_file(f"server.{name}", path(getattr(server, name))))
    for name in ("jwt_jwks_file", "jwt_jwks_ca_file", "jwt_jwks_token_file"):
        if getattr(auth, name):
            found.append(_file(f"auth.{name}", path(getattr(auth, name))))
    for i, key in enumerate(auth.jwt_public_keys):
        if "-----BEGIN" not in key:
            found.append(_file(f"auth.jwt_public_keys[{i}]", path(key)))
    if backend.type == "vault":
        vault = backend.vault
        if vault.auth_method == "token":
            if vault.token_file:
                found.append(_file("backend.vault.token_file", path(vault.token_file)))
            else:
                found.append(_variable("backend.vault.token_env", vault.token_env))
        elif vault.auth_method == "approle":
            found.append(_file("backend.vault.secret_id_file", path(vault.secret_id_file)))
        else:
            found.append(_file("backend.vault.jwt_file", path(vault.jwt_file)))
        if vault.ca_file:
            found.append(_file("backend.vault.ca_file", path(vault.ca_file)))
    else:
        pkcs11 = backend.pkcs11
        found.append(_file("backend.pkcs11.module", path(pkcs11.module)))
        if pkcs11.pin_file:
            found.append(_file("backend.pkcs11.pin_file", path(pkcs11.pin_file)))
        else:
            found.append(_variable("backend.pkcs11.pin_env", pkcs11.pin_env))
    found.append(_directory("policies.dir", path(config.policies.dir)))
    if config.audit.path:
        # The audit file and its directory are created at start, so they are not listed. An
        # unset key means a random per-process key, with a warning: not required.
        found.append(_variable("audit.hmac_key_env", config.audit.hmac_key_env, required=False))
    return found
