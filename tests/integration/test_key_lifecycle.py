"""Rotation, min_decryption_version, revocation and rewrap, against a real OpenBao."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao
from sidecar.keys import envelope
from tests.conftest import TOKEN_ENV, RunningSidecar, sidecar_config, vault_sections


@pytest.fixture
def key(openbao: DevOpenBao) -> str:
    """A transit key of this test's own, so versions moved here affect no other test."""
    name = f"life-{uuid.uuid4().hex[:8]}"
    openbao.create_key(name)
    return name


@pytest.fixture
def polled(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, key: str) -> RunningSidecar:
    sections = vault_sections(openbao, {key: {"root_poll_interval": "1s"}})
    sidecar: RunningSidecar = run_sidecar(sidecar_config(short_tmp / "l.sock", **sections))
    return sidecar


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_rotation_made_upstream_is_picked_up_within_a_poll(
    polled: RunningSidecar, openbao: DevOpenBao, key: str
) -> None:
    datakey = f"/v1/transit/datakey/plaintext/{key}"
    before = polled.request("POST", datakey).data
    assert before["key_version"] == 1
    openbao.client().secrets.transit.rotate_key(key)  # by an operator, not through the sidecar
    started = time.monotonic()
    eventually(lambda: polled.request("POST", datakey).data["key_version"] == 2)
    assert time.monotonic() - started < 3.0, "picked up within about one poll interval (1 s)"
    status = polled.request("GET", "/v1/sidecar/status").data["keys"][key]
    assert status["latest_version"] == 2 and status["kek_rotations"] == 1
    opened = polled.request(
        "POST", f"/v1/transit/decrypt/{key}", {"ciphertext": before["ciphertext"]}
    )
    assert opened.data["plaintext"] == before["plaintext"], "old blobs still open"


def test_raised_min_decryption_version_refuses_old_blobs(
    polled: RunningSidecar, openbao: DevOpenBao, key: str
) -> None:
    old = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}").data
    transit = openbao.client().secrets.transit
    transit.rotate_key(key)
    transit.update_key_configuration(key, min_decryption_version=2)
    decrypt = f"/v1/transit/decrypt/{key}"
    eventually(
        lambda: polled.request("POST", decrypt, {"ciphertext": old["ciphertext"]}).status == 400
    )
    refused = polled.request("POST", decrypt, {"ciphertext": old["ciphertext"]})
    assert refused.code == "decryption_failed"
    new = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}").data
    assert new["key_version"] == 2
    status = polled.request("GET", "/v1/sidecar/status").data["keys"][key]
    assert status["min_decryption_version"] == 2


def test_flush_revokes_cached_keks(polled: RunningSidecar, key: str) -> None:
    made = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}").data
    calls = polled.request("GET", "/v1/sidecar/status").data["backend"]["calls"]
    flushed = polled.request("POST", "/v1/sidecar/cache/flush", {"key": key})
    assert flushed.status == 200 and flushed.data["keks_dropped"] == 1
    status = polled.request("GET", "/v1/sidecar/status").data
    assert status["keys"][key]["cached_keks"] == 0 and status["keys"][key]["live_kek"] is None
    opened = polled.request(
        "POST", f"/v1/transit/decrypt/{key}", {"ciphertext": made["ciphertext"]}
    )
    assert opened.data["plaintext"] == made["plaintext"]
    after = polled.request("GET", "/v1/sidecar/status").data["backend"]["calls"]
    assert after.get("decrypt", 0) == calls.get("decrypt", 0) + 1, "the next use unwraps afresh"
    unknown = polled.request("POST", "/v1/sidecar/cache/flush", {"key": "nosuch"})
    assert unknown.status == 403
    everything = polled.request("POST", "/v1/sidecar/cache/flush", raw=b"")
    assert everything.status == 200 and everything.data["flushed"] == "*"


def test_rewrap_command_streams_a_migration(
    polled: RunningSidecar, openbao: DevOpenBao, key: str, short_tmp: Path
) -> None:
    datakey = f"/v1/transit/datakey/plaintext/{key}"
    plain = [polled.request("POST", datakey).data for _ in range(300)]
    bound = polled.request("POST", datakey, {"encryption_context": {"t": "1"}}).data
    openbao.client().secrets.transit.rotate_key(key)
    lines = [p["ciphertext"] for p in plain]
    lines.append(
        json.dumps({"id": 7, "ciphertext": bound["ciphertext"], "encryption_context": {"t": "1"}})
    )
    lines.append("")
    lines.append("sidecar:v1:garbage")
    config = short_tmp / "migrate.toml"
    config.write_text(
        f'[backend.vault]\naddresses = ["{openbao.address}"]\n'
        f'token_env = "{TOKEN_ENV}"\n[keys.{key}]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "rewrap", "--config", str(config), "--key", key],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, "one line could not be rewrapped"
    out = done.stdout.splitlines()
    assert len(out) == len(lines), "one line out for every line in"
    assert all(line.startswith("sidecar:v2:") for line in out[:300])
    moved = json.loads(out[300])
    assert moved["id"] == 7 and moved["ciphertext"].startswith("sidecar:v2:")
    assert out[301] == "" and out[302] == "sidecar:v1:garbage", "failures are copied, never lost"
    assert "line 303: not rewrapped (decryption_failed)" in done.stderr
    assert "done: 303 lines, 301 rewrapped, 1 unchanged, 1 failed" in done.stderr
    for line, original in zip(out[:3], plain[:3], strict=True):
        opened = polled.request("POST", f"/v1/transit/decrypt/{key}", {"ciphertext": line})
        assert opened.data["plaintext"] == original["plaintext"]
    opened = polled.request(
        "POST",
        f"/v1/transit/decrypt/{key}",
        {"ciphertext": moved["ciphertext"], "encryption_context": {"t": "1"}},
    )
    assert opened.data["plaintext"] == bound["plaintext"]


def test_cache_flush_command_revokes(polled: RunningSidecar, key: str) -> None:
    made = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}").data
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "cache",
            "flush",
            "--key",
            key,
            "--socket",
            polled.socket,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"cached KEKs dropped for {key}" in done.stdout
    status = polled.request("GET", "/v1/sidecar/status").data["keys"][key]
    assert status["cached_keks"] == 0 and status["live_kek"] is None
    opened = polled.request(
        "POST", f"/v1/transit/decrypt/{key}", {"ciphertext": made["ciphertext"]}
    )
    assert opened.data["plaintext"] == made["plaintext"]
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "cache",
            "flush",
            "--key",
            "nosuch",
            "--socket",
            polled.socket,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "Permission denied" in refused.stderr


def test_a_destroyed_key_stops_opening_within_a_poll_and_health_says_so(
    polled: RunningSidecar, openbao: DevOpenBao, key: str
) -> None:
    made = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}").data
    decrypt = f"/v1/transit/decrypt/{key}"
    assert polled.request("POST", decrypt, {"ciphertext": made["ciphertext"]}).status == 200
    transit = openbao.client().secrets.transit
    transit.update_key_configuration(key, deletion_allowed=True)
    transit.delete_key(key)  # what `kms-sidecar keys destroy` does; kek_ttl is still 1 h
    destroyed = time.monotonic()
    eventually(
        lambda: polled.request("POST", decrypt, {"ciphertext": made["ciphertext"]}).status == 403
    )
    assert time.monotonic() - destroyed < 3.0, "within about one poll interval (1 s)"
    refused = polled.request("POST", decrypt, {"ciphertext": made["ciphertext"]})
    assert refused.code == "permission_denied"
    issued = polled.request("POST", f"/v1/transit/datakey/plaintext/{key}")
    assert issued.status == 403 and issued.code == "permission_denied"
    status = polled.request("GET", "/v1/sidecar/status").data["keys"][key]
    assert status["state"] == "revoked" and status["cached_keks"] == 0, status
    assert status["live_kek"] is None and "no such root key" in status["problem"]
    health = polled.request("GET", "/v1/sys/health")
    assert health.status == 503 and health.json["keys"][key] == "revoked", health
    assert key in health.json["reason"]


def test_unknown_forbidden_and_missing_upstream_keys_get_one_answer(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, key: str
) -> None:
    forbidden = f"secret-{uuid.uuid4().hex[:8]}"
    openbao.create_key(forbidden)
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"  # configured, never created upstream
    policy = (
        "[[allow]]\n"
        'name = "not-the-secret"\n'
        f"when.unix_uid = [{os.getuid()}]\n"
        f'keys = ["{key}", "{ghost}", "nosuch"]\n'
        'operations = ["*"]\n'
    )
    sections = vault_sections(openbao, {key: {}, forbidden: {}, ghost: {}})
    sidecar = run_sidecar(sidecar_config(short_tmp / "o.sock", policy=policy, **sections))
    assert sidecar.request("POST", f"/v1/transit/datakey/plaintext/{key}").status == 200
    answers = {
        name: sidecar.request("POST", f"/v1/transit/datakey/plaintext/{name}")
        for name in ("nosuch", forbidden, ghost)
    }
    for name, answer in answers.items():
        assert answer.status == 403 and answer.code == "permission_denied", (name, answer)
    messages = {a.json["errors"][0].replace(repr(n), "'K'") for n, a in answers.items()}
    assert messages == {
        "Permission denied: this caller may not datakey with key 'K', or no such key exists."
    }
    health = sidecar.request("GET", "/v1/sys/health")
    assert health.status == 503 and health.json["keys"][ghost] == "revoked"
    assert health.json["keys"][key] == "ok" and "path" not in health.json.get("audit", {})


def test_two_hundred_forged_blobs_cost_one_upstream_call(polled: RunningSidecar, key: str) -> None:
    wrapped = b"vault:v1:" + base64.b64encode(os.urandom(60))  # no KEK upstream ever wrapped
    header = envelope.Header(key, 1, envelope.kek_id_for(key, wrapped), wrapped, None)
    forger = envelope.KekCipher(os.urandom(32))
    decrypt = f"/v1/transit/decrypt/{key}"
    before = polled.request("GET", "/v1/sidecar/status").data["backend"]["calls"].get("decrypt", 0)
    for i in range(200):
        blob = forger.seal_encoded(
            header.encode(), 1, os.urandom(32), context=b"{}", associated_data=b"",
            nonce=i.to_bytes(12, "big"),
        )  # fmt: skip
        answer = polled.request("POST", decrypt, {"ciphertext": blob})
        assert answer.status == 400 and answer.code == "decryption_failed", answer
    after = polled.request("GET", "/v1/sidecar/status").data["backend"]["calls"].get("decrypt", 0)
    assert after - before == 1, "the upstream's refusal is remembered"
