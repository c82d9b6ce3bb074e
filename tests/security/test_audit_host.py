"""The audit log on a shared host (issue 11 D8): its directory checked, its file 0600, and a live
file deleted or replaced under the sidecar noticed, recorded in the chain and caught by verify.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.audit.chain import verify
from sidecar.backends.memory import MemoryBackend
from sidecar.errors import ConfigError
from tests.conftest import RunningSidecar, sidecar_config

DATAKEY = "/v1/transit/datakey/wrapped/payments"


def start(short_tmp: Path, audit: Path) -> RunningSidecar:
    config = sidecar_config(short_tmp / "a.sock", keys={"payments": {}}, audit={"path": str(audit)})
    return RunningSidecar(config, MemoryBackend({"payments": "aes256"})).start()


def audit_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_audit_directory_others_can_write_stops_start_up(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=f"audit.path: {shared} \\(mode 0777\\) is writable"):
        start(short_tmp, shared / "audit.jsonl")


def test_a_pre_existing_audit_file_others_can_write_is_set_to_0600(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = short_tmp / "logs" / "audit.jsonl"
    audit.parent.mkdir(mode=0o700)
    audit.write_text("")
    audit.chmod(0o666)
    with caplog.at_level(logging.WARNING):
        sidecar = start(short_tmp, audit)
    try:
        assert audit.stat().st_mode & 0o777 == 0o600
        assert f"audit.path: {audit} was mode 0666, writable by others; changed it to 0600" in (
            caplog.text
        )
    finally:
        sidecar.stop()


def test_a_new_audit_file_is_0600(short_tmp: Path) -> None:
    audit = short_tmp / "logs" / "audit.jsonl"
    sidecar = start(short_tmp, audit)
    try:
        assert audit.stat().st_mode & 0o777 == 0o600
        assert audit.parent.stat().st_mode & 0o777 == 0o700
    finally:
        sidecar.stop()


@pytest.mark.parametrize("how", ["deleted", "replaced", "moved"])
def test_a_live_audit_file_gone_is_noticed_recorded_and_caught_by_verify(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    audit = short_tmp / "logs" / "audit.jsonl"
    sidecar = start(short_tmp, audit)
    try:
        assert sidecar.request("POST", DATAKEY, {}).status == 200
        moved = audit.with_name("elsewhere.jsonl")
        if how == "deleted":
            audit.unlink()
        elif how == "replaced":
            audit.unlink()
            audit.write_text("")  # another file at the path
            audit.chmod(0o600)
        else:
            audit.rename(moved)
        with caplog.at_level(logging.ERROR):
            assert sidecar.request("POST", DATAKEY, {}).status == 200
        head = sidecar.request("GET", "/v1/sidecar/status").data["audit"]["head"]
    finally:
        sidecar.stop()
    expected = "moved or replaced" if how == "moved" else "deleted"  # the old inode is gone
    assert f"audit log {audit} was {expected} under the sidecar" in caplog.text
    lines = audit.read_text().splitlines()
    assert '"event":"file_replaced"' in lines[0]

    result = verify([str(audit)], head)
    assert result.problem is not None and result.problem.kind == "deleted"
    assert f"the live audit file was {expected} while the sidecar ran" in result.problem.message
    cli = audit_verify("--head", head, str(audit))
    assert cli.returncode == 1, cli.stdout + cli.stderr
    if how == "moved":  # the records were kept elsewhere: given both files, the chain holds
        both = verify([str(moved), str(audit)], head)
        assert both.problem is None and both.head_seq is not None
        assert any("its records are among the files given" in note for note in both.notes)
