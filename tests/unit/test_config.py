"""Configuration: a bad key, type or value stops start-up naming its dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import dev_policy, main
from sidecar.config import config_from_mapping, load_config, parse_duration
from sidecar.errors import ConfigError

FULL = """
[server]
socket = "/run/kms-sidecar/sidecar.sock"
socket_mode = "0660"
max_body_bytes = 1048576

[auth]
jwt_audiences = ["kms"]
jwt_leeway = "30s"

[backend]
type = "vault"

[backend.vault]
addresses = ["http://127.0.0.1:8200", "http://127.0.0.1:8202"]
timeout = "5s"

[keys.payments]
root_key = "payments-root"
kek_ttl = "1h"
kek_max_uses = 1048576
upstream_grace = "5m"

[keys.default]

[audit]
path = ""
"""


def test_full_design_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.keys["payments"].kek_ttl == 3600.0
    assert config.keys["payments"].upstream_grace == 300.0
    assert config.root_key_name("payments") == "payments-root"
    assert config.root_key_name("default") == "default"
    assert config.backend.vault.addresses == ("http://127.0.0.1:8200", "http://127.0.0.1:8202")
    assert config.server.socket_mode_bits == 0o660
    with pytest.raises(AttributeError):
        config.server.socket = "/elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"sokcet": "/x"}}, "server.sokcet: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"server": {"max_body_bytes": "1MB"}}, "server.max_body_bytes: expected an integer"),
        ({"server": {"max_body_bytes": True}}, "server.max_body_bytes: expected an integer"),
        ({"server": {"socket_mode": "rw"}}, "server.socket_mode: expected an octal mode"),
        ({"auth": {"peercred": "yes"}}, "auth.peercred: expected a boolean"),
        ({"auth": {"jwt_audiences": "kms"}}, "auth.jwt_audiences: expected a list"),
        ({"auth": {"jwt_leeway": "soon"}}, "auth.jwt_leeway: expected a duration"),
        ({"backend": {"type": "aws"}}, "backend.type: expected 'vault' or 'pkcs11'"),
        ({"backend": {"vault": {"addresses": ["127.0.0.1:8200"]}}}, "backend.vault.addresses[0]"),
        ({"keys": {"payments": {"kek_ttl": 5, "kek_max_uses": 0}}}, "keys.payments.kek_max_uses"),
        ({"keys": {"payments": {"colour": "red"}}}, "keys.payments.colour: unknown key"),
        ({"keys": {"bad name": {}}}, "keys.bad name: key names"),
        ({"server": {"tcp_address": "127.0.0.1:8443"}}, "server.tls_cert_file: required"),
        ({"backend": {"vault": {"auth_method": "approle"}}}, "backend.vault.role_id: required"),
        (
            {"backend": {"vault": {"auth_method": "jwt", "role": "r"}}},
            "backend.vault.jwt_file: required",
        ),
    ],
)
def test_bad_config_names_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_mapping(raw)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), (15, 15), ("250ms", 0.25)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_check_config_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    good = tmp_path / "good.toml"
    good.write_text(FULL)
    # Written here, run elsewhere: what the target host holds is listed, not required.
    assert main(["check-config", "--config", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "configuration OK" in out and "policies not checked" in out
    assert "not on this host: policies.dir" in err
    assert "not on this host: backend.vault.token_env = VAULT_TOKEN" in err
    assert main(["check-config", "--strict", "--config", str(good)]) == 2
    assert "missing on this host (--strict): backend.vault.token_env, policies.dir" in (
        capsys.readouterr().err
    )
    policies = tmp_path / "policies"  # "policies" is relative to the config file
    policies.mkdir()
    (policies / "a.toml").write_text(dev_policy(1000))
    assert main(["check-config", "--config", str(good)]) == 0
    assert f"1 policy rule in {policies}" in capsys.readouterr().out
    (policies / "b.toml").write_text("[[allow]]\nname = \n")
    assert main(["check-config", "--config", str(good)]) == 2, "policy files present are checked"
    assert "b.toml" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmax_body_bytes = 'lots'\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "server.max_body_bytes" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_check_config_passes_on_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parents[2] / "examples" / "sidecar.toml"
    assert main(["check-config", "--config", str(example)]) == 0
    assert "configuration OK: backend vault, keys: payments, reports" in capsys.readouterr().out


def test_an_empty_policies_dir_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"policies.dir: must name the directory"):
        config_from_mapping({"policies": {"dir": ""}})


def test_kms_v2_is_off_until_a_key_is_named() -> None:
    from sidecar.config import config_from_mapping

    assert not config_from_mapping({}).kms_v2.enabled
    config = config_from_mapping({"keys": {"etcd": {}}, "kms_v2": {"key": "etcd"}})
    assert config.kms_v2.enabled and config.kms_v2.socket_mode_bits == 0o600


@pytest.mark.parametrize(
    ("kms_v2", "message"),
    [
        ({"key": "nope"}, "kms_v2.key: 'nope' is not one of the configured"),
        ({"key": "etcd", "socket_mode": "rw"}, "kms_v2.socket_mode: expected an octal mode"),
        ({"key": "etcd", "socket": "/run/s.sock"}, "kms_v2.socket: must differ from server.socket"),
        ({"key": "etcd", "port": 1}, "kms_v2.port: unknown key"),
    ],
)
def test_kms_v2_mistakes_name_their_key(kms_v2: dict[str, object], message: str) -> None:
    from sidecar.config import config_from_mapping

    raw = {"server": {"socket": "/run/s.sock"}, "keys": {"etcd": {}}, "kms_v2": kms_v2}
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(raw)
