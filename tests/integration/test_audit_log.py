"""The audit writer on real files, with real fsync, on a real event loop.

Write failures are made in ways that also work as root (CI runs tests as root, and root ignores
permission bits): the log's directory is swapped for a regular file, which fails every open with
ENOTDIR, and, where the kernel lets us mount, a tiny tmpfs is filled for a real ENOSPC.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import AuditLog, audit_record, hmac_key_id, verify
from sidecar.audit.record import AuditRecord
from sidecar.config import config_from_mapping
from sidecar.errors import AuditUnavailable, ConfigError
from sidecar.identity import Identity, PeerCredentials

KEY = b"k" * 32
PEER = Identity(peer=PeerCredentials(uid=1000, gid=1000, pid=4242, exe="/usr/bin/app"))

Opener = Callable[..., Awaitable[AuditLog]]


def request(n: int) -> AuditRecord:
    return audit_record(
        time=1_800_000_000.0 + n,
        request_id=f"req-{n}",
        trace_id=None,
        identity=PEER,
        rule="app",
        operation="datakey",
        key="payments",
        root_version=1,
        kek_id="00" * 16,
        outcome="ok",
        error_code=None,
        context={"tenant": "acme"},
        hmac_key=KEY,
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def events(path: Path) -> list[str]:
    return [r["event"] for r in records(path)]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def torn_files(directory: Path) -> list[Path]:
    return list(directory.glob("audit.log.torn-*"))


def chain_files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.iterdir() if p.name.startswith("audit.log"))


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` on the loop until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition did not hold in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def open_log() -> AsyncIterator[Opener]:
    """``await open_log(path, **options)``: an opened AuditLog, closed after the test."""
    logs: list[AuditLog] = []

    async def opener(path: Path, **options: Any) -> AuditLog:
        options.setdefault("hmac_key", KEY)
        log = AuditLog(str(path), **options)
        logs.append(log)
        await log.open()
        return log

    yield opener
    for log in logs:
        await log.close()


# -- durability and group commit -----------------------------------------------------------


async def test_concurrent_fail_closed_writes_are_all_durable_and_verify(
    tmp_path: Path, open_log: Opener
) -> None:
    path = tmp_path / "logs" / "audit.log"
    log = await open_log(path, fail_closed=True)

    await asyncio.gather(*(log.write(request(n)) for n in range(1000)))

    # Every write returned, so every record is on disk now, before any close.
    written = records(path)
    assert {r["request_id"] for r in written if r["event"] == "request"} == {
        f"req-{n}" for n in range(1000)
    }
    result = verify([str(path)], head=log.head)
    assert result.ok, result.problem
    assert result.records == 1001  # the start record and 1000 requests
    assert log.head_seq == 1001
    stats = log.stats()
    assert stats.records_written == 1001
    assert stats.groups < 100  # group commit: many records per fsync
    assert stats.max_group_size >= 100
    assert stats.queue_depth == 0
    assert log.healthy


async def test_file_and_directory_are_private(tmp_path: Path, open_log: Opener) -> None:
    path = tmp_path / "new" / "audit.log"
    await open_log(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_close_flushes_queued_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), hmac_key=KEY, fail_closed=False)
    await log.open()
    for n in range(500):
        await log.write(request(n))  # returns at once: nothing is written yet
    assert log.stats().queue_depth == 500
    await log.close()

    assert events(path) == ["start"] + ["request"] * 500 + ["stop"]
    assert records(path)[-1]["records"] == 501
    assert verify([str(path)], head=log.head).ok


async def test_write_after_close_is_refused_when_fail_closed(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), hmac_key=KEY, fail_closed=True)
    await log.open()
    await log.close()
    with pytest.raises(AuditUnavailable):
        await log.write(request(1))
    await log.close()  # idempotent


async def test_cancelled_caller_still_gets_its_record_written(
    tmp_path: Path, open_log: Opener
) -> None:
    path = tmp_path / "audit.log"
    log = await open_log(path)
    task = asyncio.create_task(log.write(request(7)))
    await asyncio.sleep(0)  # queued
    task.cancel()
    await log.write(request(8))  # durable, and it was queued after req-7
    assert [r["request_id"] for r in records(path) if r["event"] == "request"] == [
        "req-7",
        "req-8",
    ]


async def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    for run in range(3):
        log = AuditLog(str(path), hmac_key=KEY)
        await log.open()
        await log.write(request(run))
        await log.close()
    assert events(path) == ["start", "request", "stop"] * 3
    result = verify([str(path)], head=log.head)
    assert result.ok
    assert result.last_seq == 9


async def test_start_record_identifies_the_hmac_key(tmp_path: Path, open_log: Opener) -> None:
    path = tmp_path / "audit.log"
    await open_log(path)
    start = records(path)[0]
    assert start["event"] == "start"
    assert start["hmac_key_ephemeral"] is False
    assert start["hmac_key_id"] == hmac_key_id(KEY)
    assert start["pid"] == os.getpid()
    assert start["fail_closed"] is True


async def test_from_config_uses_the_key_from_the_environment(tmp_path: Path) -> None:
    config = config_from_mapping(
        {"audit": {"path": "audit.log", "hmac_key_env": "AUDIT_KEY"}}, base_dir=str(tmp_path)
    )
    log = AuditLog.from_config(config, environ={"AUDIT_KEY": "k" * 32})
    assert log is not None
    assert log.path == str(tmp_path / "audit.log")
    assert log.hmac_key == KEY
    assert not log.hmac_key_ephemeral
    assert AuditLog.from_config(config_from_mapping({"audit": {"path": ""}})) is None


async def test_unset_key_env_uses_a_random_key_and_says_so(
    tmp_path: Path, open_log: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    await open_log(path, hmac_key=None)
    assert "cannot be compared across restarts" in caplog.text
    assert records(path)[0]["hmac_key_ephemeral"] is True


# -- rotation ------------------------------------------------------------------------------


async def test_rotation_by_size_keeps_one_chain(tmp_path: Path, open_log: Opener) -> None:
    path = tmp_path / "audit.log"
    log = await open_log(path, max_file_bytes=8_000)
    await asyncio.gather(*(log.write(request(n)) for n in range(100)))

    files = chain_files(tmp_path)
    assert len(files) > 5
    for name in files:
        info = os.stat(name)
        assert info.st_size <= 8_000
        assert stat.S_IMODE(info.st_mode) == 0o600
    result = verify(files, head=log.head)
    assert result.ok, result.problem
    assert result.records == 101
    first_of_live = records(path)[0]
    assert first_of_live["seq"] > 1  # the live file continues the chain of the rotated ones


async def test_missing_live_file_continues_from_the_newest_rotated_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), hmac_key=KEY)
    await log.open()
    await log.write(request(1))
    await log.close()
    path.rename(tmp_path / "audit.log.20250101T000000Z")  # as if a crash followed the rename

    log = AuditLog(str(path), hmac_key=KEY)
    await log.open()
    await log.close()
    assert records(path)[0]["seq"] == 4
    assert verify(chain_files(tmp_path), head=log.head).ok


# -- torn records --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "torn",
    [b'{"cause":null,"context":{"ten', b"\0" * 700, b'{"seq": 9, "garbage": true}\n{"cau'],
    ids=["partial-line", "zero-filled", "bad-line-then-partial"],
)
async def test_torn_tail_is_set_aside_with_a_recovery_record(
    tmp_path: Path, open_log: Opener, torn: bytes
) -> None:
    path = tmp_path / "audit.log"
    log = await open_log(path)
    await log.write(request(1))
    await log.close()
    append(path, torn)

    log = await open_log(path)  # start-up does not stop
    await log.write(request(2))

    set_aside = torn_files(tmp_path)
    assert len(set_aside) == 1
    assert set_aside[0].read_bytes() == torn
    assert stat.S_IMODE(set_aside[0].stat().st_mode) == 0o600
    recovered = [r for r in records(path) if r["event"] == "recovered"]
    assert len(recovered) == 1
    assert recovered[0]["torn_bytes"] == len(torn)
    assert recovered[0]["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert recovered[0]["torn_file"] == set_aside[0].name
    assert events(path)[-3:] == ["recovered", "start", "request"]
    result = verify(chain_files(tmp_path), head=log.head)  # the .torn file is skipped
    assert result.ok, result.problem
    assert any("torn record" in note for note in result.notes)


@pytest.mark.parametrize(
    "content",
    [b"root:x:0:0:root:/root:/bin/bash\n", b'{"level":"info"}\n{"level":"warn"}\n{"lev'],
    ids=["text", "other-json-lines"],
)
async def test_a_file_that_is_not_an_audit_log_stops_start_up(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(content)
    log = AuditLog(str(path), hmac_key=KEY, fail_closed=False)
    with pytest.raises(ConfigError, match=r"audit\.path: .*audit\.log.*no valid audit record"):
        await log.open()
    assert path.read_bytes() == content  # untouched
    assert torn_files(tmp_path) == []


async def test_a_torn_first_write_is_set_aside(tmp_path: Path, open_log: Opener) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"event":"start","fail_closed":tr')
    await open_log(path)
    assert events(path) == ["recovered", "start"]
    assert verify([str(path)]).ok


async def test_a_second_writer_is_refused(tmp_path: Path, open_log: Opener) -> None:
    path = tmp_path / "audit.log"
    await open_log(path)
    with pytest.raises(ConfigError, match="another process"):
        await AuditLog(str(path), hmac_key=KEY).open()


# -- write failures and recovery -----------------------------------------------------------


@pytest.fixture
def swappable_dir(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None], Callable[[], None]]]:
    """A log directory, ``break_it()`` (the directory swapped for a regular file) and
    ``fix_it()``.
    """
    directory = tmp_path / "logs"
    directory.mkdir()
    aside = tmp_path / "logs.aside"

    def break_it() -> None:
        directory.rename(aside)
        directory.write_text("not a directory")

    def fix_it() -> None:
        directory.unlink()
        aside.rename(directory)

    yield directory, break_it, fix_it
    if aside.exists():
        fix_it()


async def test_unwritable_log_refuses_with_fail_closed_and_recovers(
    swappable_dir: tuple[Path, Callable[[], None], Callable[[], None]], open_log: Opener
) -> None:
    directory, break_it, fix_it = swappable_dir
    path = directory / "audit.log"
    log = await open_log(path, fail_closed=True)
    await log.write(request(1))
    assert log.healthy

    break_it()
    for n in (2, 3):
        with pytest.raises(AuditUnavailable):
            await log.write(request(n))
    assert not log.healthy
    assert log.last_error is not None and "ENOTDIR" in log.last_error
    assert log.stats().write_failures >= 2

    fix_it()
    await log.write(request(4))
    assert log.healthy
    assert [r["event"] for r in records(path)] == [
        "start",
        "request",
        "file_replaced",
        "resumed",
        "request",
    ]
    resumed = records(path)[3]
    assert "moved, replaced or removed" in resumed["reason"]
    assert resumed["dropped"] == 0  # fail-closed refuses; it never drops
    assert [r["request_id"] for r in records(path) if r["event"] == "request"] == [
        "req-1",
        "req-4",
    ]
    assert verify([str(path)], head=log.head).ok


async def test_fail_open_drops_counts_and_recovers_without_traffic(
    swappable_dir: tuple[Path, Callable[[], None], Callable[[], None]], open_log: Opener
) -> None:
    directory, break_it, fix_it = swappable_dir
    path = directory / "audit.log"
    log = await open_log(path, fail_closed=False, retry_interval=0.01)
    break_it()
    for n in range(5):
        await log.write(request(n))  # never raises
    await eventually(lambda: not log.healthy and log.stats().records_dropped == 5)

    fix_it()
    await eventually(lambda: log.healthy)  # the idle probe found the file again
    resumed = [r for r in records(path) if r["event"] == "resumed"]
    assert len(resumed) == 1
    assert resumed[0]["dropped"] == 5
    assert verify([str(path)], head=log.head).ok


async def test_unwritable_path_at_start_stops_start_up_when_fail_closed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "audit.log"
    with pytest.raises(ConfigError, match=rf"audit\.path: .*{path}"):
        await AuditLog(str(path), hmac_key=KEY, fail_closed=True).open()


async def test_unwritable_path_at_start_is_retried_when_fail_open(
    tmp_path: Path, open_log: Opener
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("")
    path = blocker / "audit.log"
    log = await open_log(path, fail_closed=False, retry_interval=0.01)
    assert not log.healthy
    await log.write(request(1))

    blocker.unlink()
    blocker.mkdir()
    await eventually(lambda: log.healthy)
    assert events(path) == ["resumed", "start", "request"]
    assert verify([str(path)], head=log.head).ok


async def test_a_removed_log_file_is_recreated_and_the_gap_is_visible(
    tmp_path: Path, open_log: Opener
) -> None:
    path = tmp_path / "audit.log"
    log = await open_log(path)
    await log.write(request(1))
    path.rename(tmp_path / "stolen.log")

    await log.write(request(2))
    assert log.healthy
    assert events(path) == ["file_replaced", "resumed", "request"]
    assert records(path)[0]["seq"] == 3  # the chain went on; it did not restart at 1
    both = verify([str(tmp_path / "stolen.log"), str(path)], head=log.head)
    assert both.ok, both.problem


# -- a real ENOSPC, where the kernel lets us mount a tmpfs -----------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        _umount(mount_point)


def _umount(mount_point: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(mount_point), 2) != 0:  # MNT_DETACH
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_refuses_with_fail_closed_and_recovers(
    tiny_fs: Path, open_log: Opener
) -> None:
    path = tiny_fs / "audit.log"
    log = await open_log(path, fail_closed=True)
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)

    refused = 0
    for n in range(50):
        try:
            await log.write(request(n))
        except AuditUnavailable:
            refused += 1
    assert refused > 0
    assert not log.healthy
    assert log.last_error is not None and "ENOSPC" in log.last_error

    filler.unlink()
    await log.write(request(100))
    assert log.healthy
    result = verify([str(path)], head=log.head)
    assert result.ok, result.problem  # no torn or half-written record was left behind
    resumed = [r for r in records(path) if r["event"] == "resumed"]
    assert len(resumed) == 1
    assert "ENOSPC" in resumed[0]["reason"]
    assert records(path)[-1]["request_id"] == "req-100"
    await log.close()
