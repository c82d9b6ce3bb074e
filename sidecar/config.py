"""Typed, frozen configuration loaded from TOML and validated at start.

Precedence: built-in defaults, then the file. An unknown key, a wrong type or a bad value raises
:class:`~sidecar.errors.ConfigError` naming the dotted key (``server.socket_mode``), so start-up
stops with a message an operator can act on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from sidecar.errors import ConfigError, quoted

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "KMS_SIDECAR_CONFIG"

# ASCII only: ``\d`` alone would also take other scripts' digits, and ``\s`` other spaces.
_DURATION = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*(ms|s|m|h|d)?\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds, or a string such as ``"90s"``, ``"5m"``, ``"1h"``.

    Raises ``ValueError`` for anything else: negative, infinite or NaN numbers, integers too
    large for a float, and digits other than ASCII ``0-9``.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("a duration must be a finite number of seconds") from None
    else:
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"expected a duration like '90s', '5m' or '1h', got {quoted(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _duration(default: str) -> Any:
    return field(default=parse_duration(default), metadata={"duration": True})


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/kms-sidecar/sidecar.sock"
    socket_mode: str = "0660"
    socket_group: str = ""
    max_body_bytes: int = 1_048_576
    max_plaintext_bytes: int = 65_536
    max_batch_items: int = 1000
    tcp_address: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    drain_timeout: float = _duration("10s")
    #: Connection bounds (see docs/configuration.md and sidecar/server/connections.py).
    idle_timeout: float = _duration("60s")
    header_timeout: float = _duration("10s")
    body_timeout: float = _duration("30s")
    max_connections: int = 1024
    max_connections_per_uid: int = 256
    listen_backlog: int = 1024

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class AuthConfig:
    peercred: bool = True
    jwt_issuer: str = ""
    jwt_audiences: tuple[str, ...] = ()
    jwt_jwks_file: str = ""
    jwt_jwks_url: str = ""
    #: For ``jwt_jwks_url``: a CA bundle to trust instead of the system's, and a file whose
    #: token is sent as ``Authorization: Bearer`` (a cluster's own JWKS endpoint needs both).
    jwt_jwks_ca_file: str = ""
    jwt_jwks_token_file: str = ""
    jwt_public_keys: tuple[str, ...] = ()
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    jwt_leeway: float = _duration("30s")

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.jwt_jwks_file or self.jwt_jwks_url or self.jwt_public_keys)


@dataclass(frozen=True)
class VaultConfig:
    addresses: tuple[str, ...] = ("http://127.0.0.1:8200",)
    mount: str = "transit"
    auth_method: str = "token"
    token_env: str = "VAULT_TOKEN"  # noqa: S105 - the name of a variable
    token_file: str = ""
    role_id: str = ""
    secret_id_file: str = ""
    auth_mount: str = ""
    role: str = ""
    jwt_file: str = ""
    timeout: float = _duration("5s")
    ca_file: str = ""
    max_concurrency: int = 16


@dataclass(frozen=True)
class Pkcs11Config:
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "kms"  # noqa: S105 - a label, not a secret
    pin_env: str = "KMS_HSM_PIN"
    pin_file: str = ""


@dataclass(frozen=True)
class BackendConfig:
    type: str = "vault"
    vault: VaultConfig = field(default_factory=VaultConfig)
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)


@dataclass(frozen=True)
class KeyConfig:
    root_key: str = ""
    kek_ttl: float = _duration("1h")
    kek_max_uses: int = 1 << 20
    upstream_grace: float = _duration("5m")
    root_poll_interval: float = _duration("30s")
    expiry_leeway: float = _duration("5s")


@dataclass(frozen=True)
class PoliciesConfig:
    dir: str = "policies"


@dataclass(frozen=True)
class AuditConfig:
    path: str = ""
    hmac_key_env: str = "KMS_AUDIT_HMAC_KEY"
    fail_closed: bool = True
    max_file_bytes: int = 100 * 1_048_576


@dataclass(frozen=True)
class TelemetryConfig:
    service_name: str = "kms-sidecar"
    otlp_endpoint: str = ""
    log_format: str = "text"
    log_level: str = "INFO"


@dataclass(frozen=True)
class KmsV2Config:
    """The Kubernetes KMS v2 provider (see docs/kubernetes.md): off while ``key`` is empty."""

    socket: str = "/run/kms-sidecar/kms-v2.sock"
    socket_mode: str = "0600"
    socket_group: str = ""
    #: One of ``[keys.*]``; its blobs seal the apiserver's DEK seeds.
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class Config:
    """The whole configuration. Build it with :func:`load_config` or :func:`config_from_mapping`."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    keys: Mapping[str, KeyConfig] = field(default_factory=dict)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    kms_v2: KmsV2Config = field(default_factory=KmsV2Config)
    #: The directory relative paths in the file are resolved against.
    base_dir: str = field(default=".", metadata={"internal": True})

    def root_key_name(self, key_name: str) -> str:
        """The key's name upstream or in the HSM (``root_key``, defaulting to the API name)."""
        return self.keys[key_name].root_key or key_name

    def resolve_path(self, path: str) -> str:
        """``path`` made absolute against the config file's directory; "" stays ""."""
        if not path:
            return path
        return str(Path(self.base_dir, os.path.expanduser(path)))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``. Raises ``ConfigError``."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
    return config_from_mapping(raw, base_dir=str(Path(path).resolve().parent))


def config_from_mapping(raw: Mapping[str, Any], *, base_dir: str = ".") -> Config:
    """Validate a parsed TOML document into a :class:`Config`. Raises ``ConfigError``."""
    config = _build(Config, raw, "")
    config = dataclasses.replace(config, base_dir=base_dir)
    _validate(config)
    return config


_T = TypeVar("_T")


def _build(cls: type[_T], raw: Any, path: str) -> _T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{_join(path, key)}: unknown key")
    values = {
        name: _convert(hints[name], raw[name], _join(path, name), f.metadata.get("duration", False))
        for name, f in fields.items()
        if name in raw
    }
    return cls(**values)


def _convert(hint: Any, value: Any, path: str, duration: bool) -> Any:
    origin = typing.get_origin(hint)
    if duration:
        try:
            return parse_duration(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)  # type: ignore[arg-type]
    if origin in (Mapping, dict):
        _, value_type = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table")
        return {k: _convert(value_type, v, _join(path, k), False) for k, v in value.items()}
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_type).split()[-1]}s")
        return tuple(_convert(item_type, v, f"{path}[{i}]", False) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional keys yet
        raise ConfigError(f"{path}: unsupported type")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is bool and not isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {_type_name(hint)}, got {_type_name(type(value))}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected an integer, got a boolean")
    return value


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}.get(
        t, getattr(t, "__name__", str(t))
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
KEY_NAME_RULE = (
    "key names are 1 to 128 letters, digits, '_', '.' and '-', starting with a letter or digit"
)
"""The one wording of the key-name rule, for every layer that refuses a name."""


def is_key_name(name: str) -> bool:
    """Whether ``name`` may name a key (``[keys.<name>]``, a root key, an HSM label)."""
    return _KEY_NAME.fullmatch(name) is not None


def tcp_host_port(address: str) -> tuple[str, int]:
    """The host (without ``[]``) and port of ``server.tcp_address``. Raises ``ConfigError``."""
    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError("server.tcp_address: expected HOST:PORT such as '127.0.0.1:8443'")
    return host.strip("[]"), int(port)


def check_max_file_bytes(value: int) -> int:
    """``audit.max_file_bytes`` if usable (0: never rotate). Raises ``ConfigError``."""
    if value < 0:
        raise ConfigError("audit.max_file_bytes: must be positive, or 0 to never rotate")
    return value


_AUTH_METHOD_FIELDS: Final = {
    "token": (),
    "approle": ("role_id", "secret_id_file"),
    "jwt": ("role", "jwt_file"),
}


def check_auth_method(vault: VaultConfig) -> None:
    """``backend.vault.auth_method`` is known and its fields are set. Raises ``ConfigError``."""
    if vault.auth_method not in _AUTH_METHOD_FIELDS:
        raise ConfigError("backend.vault.auth_method: expected 'token', 'approle' or 'jwt'")
    for name in _AUTH_METHOD_FIELDS[vault.auth_method]:
        if not getattr(vault, name):
            raise ConfigError(
                f"backend.vault.{name}: required when auth_method is {vault.auth_method!r}"
            )


def _validate(config: Config) -> None:
    server = config.server
    if not re.fullmatch(r"0?[0-7]{3}", server.socket_mode):
        raise ConfigError("server.socket_mode: expected an octal mode such as '0660'")
    for name in (
        "max_body_bytes",
        "max_plaintext_bytes",
        "max_batch_items",
        "max_connections",
        "max_connections_per_uid",
        "listen_backlog",
        "idle_timeout",
        "header_timeout",
        "body_timeout",
    ):
        if getattr(server, name) <= 0:
            raise ConfigError(f"server.{name}: must be positive")
    if server.tcp_address:
        tcp_host_port(server.tcp_address)
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if not getattr(server, name):
                raise ConfigError(f"server.{name}: required when server.tcp_address is set")
    if config.backend.type not in ("vault", "pkcs11"):
        raise ConfigError("backend.type: expected 'vault' or 'pkcs11'")
    vault = config.backend.vault
    if config.backend.type == "vault":
        if not vault.addresses:
            raise ConfigError("backend.vault.addresses: at least one address is required")
        for i, address in enumerate(vault.addresses):
            if not re.match(r"^https?://", address):
                raise ConfigError(f"backend.vault.addresses[{i}]: expected an http(s):// URL")
        check_auth_method(vault)
        if vault.max_concurrency <= 0:
            raise ConfigError("backend.vault.max_concurrency: must be positive")
    for name, key in config.keys.items():
        if not is_key_name(name):
            raise ConfigError(f"keys.{name}: {KEY_NAME_RULE}")
        if not 0 < key.kek_max_uses <= 1 << 31:
            raise ConfigError(
                f"keys.{name}.kek_max_uses: must be between 1 and 2^31 (random-nonce AES-GCM limit)"
            )
        if key.kek_ttl <= 0:
            raise ConfigError(f"keys.{name}.kek_ttl: must be positive")
        if key.root_poll_interval <= 0:
            raise ConfigError(f"keys.{name}.root_poll_interval: must be positive")
    if not config.policies.dir:
        raise ConfigError(
            "policies.dir: must name the directory of policy files; an empty directory "
            "denies every request"
        )
    _validate_kms_v2(config)
    check_max_file_bytes(config.audit.max_file_bytes)
    if config.telemetry.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("telemetry.log_level: expected DEBUG, INFO, WARNING or ERROR")
    if config.telemetry.log_format not in ("text", "json"):
        raise ConfigError("telemetry.log_format: expected 'text' or 'json'")


def _validate_kms_v2(config: Config) -> None:
    kms = config.kms_v2
    if not kms.enabled:
        return
    if kms.key not in config.keys:
        raise ConfigError(f"kms_v2.key: {kms.key!r} is not one of the configured [keys.*]")
    if not re.fullmatch(r"0?[0-7]{3}", kms.socket_mode):
        raise ConfigError("kms_v2.socket_mode: expected an octal mode such as '0600'")
    if not kms.socket:
        raise ConfigError("kms_v2.socket: required when kms_v2.key is set")
    if config.resolve_path(kms.socket) == config.resolve_path(config.server.socket):
        raise ConfigError("kms_v2.socket: must differ from server.socket")
