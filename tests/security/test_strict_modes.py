"""A socket or audit directory that another user could write stops start-up (sshd's StrictModes).

The suite runs as root, so "another user" is made with chown; directories live under pytest's
tmp_path (0700, under the sticky, world-writable /tmp, which the sticky-bit rule allows).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.devmode import private_directory
from sidecar.errors import ConfigError
from sidecar.strict_modes import check_directory, tighten_file
from sidecar.transport.listener import unix_listener
from tests.conftest import RunningSidecar, sidecar_config

STRANGER = 54321  # a uid no test process runs as


def test_the_suites_own_directories_pass(tmp_path: Path, short_tmp: Path) -> None:
    check_directory(str(tmp_path), setting="server.socket", holds="the socket")
    check_directory(str(short_tmp), setting="server.socket", holds="the socket")


@pytest.mark.parametrize(("mode", "who"), [(0o777, "other users"), (0o770, "its group")])
def test_a_directory_others_can_write_is_refused_naming_it(
    tmp_path: Path, mode: int, who: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        check_directory(str(shared), setting="server.socket", holds="the socket")
    message = str(refused.value)
    assert message.startswith(f"server.socket: {shared} (mode {mode:04o}) is writable by {who}")
    assert "chmod go-w" in message


def test_a_sticky_world_writable_directory_is_allowed(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    check_directory(str(sticky), setting="server.socket", holds="the socket")


def test_a_writable_directory_above_is_refused_naming_that_one(tmp_path: Path) -> None:
    above = tmp_path / "above"
    below = above / "private"
    below.mkdir(parents=True)
    below.chmod(0o700)
    above.chmod(0o757)
    with pytest.raises(ConfigError, match=f"server.socket: {above} \\(mode 0757\\)"):
        check_directory(str(below), setting="server.socket", holds="the socket")


def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, STRANGER, -1)
    with pytest.raises(ConfigError, match=f"{theirs} is owned by uid {STRANGER}, another user"):
        check_directory(str(theirs), setting="audit.path", holds="the audit log")


def test_a_symlink_is_checked_where_it_leads(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(shared)
    with pytest.raises(ConfigError, match=f"{shared} \\(mode 0777\\)"):
        check_directory(str(tmp_path / "link"), setting="server.socket", holds="the socket")


def test_the_listener_refuses_a_world_writable_directory(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "sidecar.sock"
    with (
        pytest.raises(ConfigError, match=f"server.socket: {shared} \\(mode 0777\\)"),
        unix_listener(str(path), 0o600),
    ):
        pass
    assert not path.exists()  # refused before anything was bound


def test_the_sidecar_does_not_start_with_its_socket_where_others_write(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    config = sidecar_config(shared / "sidecar.sock", keys={"payments": {}})
    shared.chmod(0o777)
    sidecar = RunningSidecar(config, MemoryBackend({"payments": "aes256"}))
    with pytest.raises(ConfigError, match=f"server.socket: {shared} \\(mode 0777\\)"):
        sidecar.start()


def test_a_pre_existing_audit_file_others_can_write_is_set_to_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    audit.chmod(0o666)
    with caplog.at_level(logging.WARNING):
        tighten_file(str(audit), setting="audit.path")
    assert audit.stat().st_mode & 0o777 == 0o600
    assert f"audit.path: {audit} was mode 0666, writable by others; changed it to 0600" in (
        caplog.text
    )


def test_an_audit_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    os.chown(audit, STRANGER, -1)
    with pytest.raises(ConfigError, match=f"audit.path: {audit} is owned by uid {STRANGER}"):
        tighten_file(str(audit), setting="audit.path")


def test_dev_mode_uses_a_private_directory_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    first, second = private_directory(), private_directory()
    try:
        assert first != second  # not predictable
        for made in (first, second):
            assert made.stat().st_mode & 0o777 == 0o700
            assert made.stat().st_uid == os.geteuid()
            check_directory(str(made), setting="server.socket", holds="the socket")
            with unix_listener(str(made / "s.sock"), 0o600) as sock:
                assert sock.family == socket.AF_UNIX
    finally:
        first.rmdir()
        second.rmdir()
