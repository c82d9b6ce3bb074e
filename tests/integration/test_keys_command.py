"""``kms-sidecar keys`` against a real OpenBao transit engine (the HSM side is in hsm/)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import hvac
import pytest

from sidecar.devserver import DevOpenBao
from tests.integration.conftest import TOKEN_ENV


def keys_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ,
    )


def transit_key(client: hvac.Client, name: str) -> dict[str, object] | None:
    try:
        data: dict[str, object] = client.secrets.transit.read_key(name)["data"]
    except hvac.exceptions.InvalidPath:
        return None
    return data


def test_keys_command_manages_transit_keys(openbao: DevOpenBao, tmp_path: Path) -> None:
    api_name, root = f"api-{uuid.uuid4().hex[:8]}", f"root-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f"""
[backend.vault]
addresses = ["{openbao.address}"]
token_env = "{TOKEN_ENV}"

[keys.{api_name}]
root_key = "{root}"
"""
    )
    client = openbao.client()

    created = keys_command(config, "create", api_name, "--type", "ed25519")
    assert created.returncode == 0, created.stderr
    assert f"created ed25519 root key '{root}' in the vault backend" in created.stdout
    key = transit_key(client, root)
    assert key is not None and key["type"] == "ed25519"

    listed = keys_command(config, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith(root + " "))
    assert row == [root, "ed25519", "1", "1", api_name]

    rotated = keys_command(config, "rotate", api_name)
    assert rotated.returncode == 0 and "to version 2" in rotated.stdout, rotated
    assert transit_key(client, root)["latest_version"] == 2  # type: ignore[index]

    status = keys_command(config, "status", api_name)
    assert status.returncode == 0 and "supports_signing" in status.stdout, status

    refused = keys_command(config, "destroy", api_name)
    assert refused.returncode == 2 and "crypto-shredding" in refused.stderr
    assert transit_key(client, root) is not None

    destroyed = keys_command(config, "destroy", api_name, "--yes-destroy-all-data")
    assert destroyed.returncode == 0, destroyed.stderr
    assert transit_key(client, root) is None
    gone = keys_command(config, "status", api_name)
    assert gone.returncode == 1 and f"root key '{root}' does not exist" in gone.stderr, gone
    again = keys_command(config, "rotate", api_name)
    assert again.returncode == 1 and f"root key '{root}' does not exist" in again.stderr, again


def test_keys_command_without_a_config_or_reachable_upstream(tmp_path: Path) -> None:
    missing = keys_command(tmp_path / "nope.toml", "list")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    config = tmp_path / "down.toml"
    config.write_text(
        '[backend.vault]\naddresses = ["http://127.0.0.1:9"]\ntoken_env = "NO_SUCH_TOKEN_ENV"\n'
    )
    down = keys_command(config, "list")
    assert down.returncode in (1, 2), down
    assert "Traceback" not in down.stderr


@pytest.fixture(autouse=True)
def _token(openbao: DevOpenBao) -> None:
    """The session's OpenBao token is in the environment the command inherits."""
    assert os.environ.get(TOKEN_ENV)
