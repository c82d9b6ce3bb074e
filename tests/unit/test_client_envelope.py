"""Data keys and local envelope encryption against a fake sidecar that really wraps keys.

The fake wraps each DEK with AES-GCM under a per-version KEK, binding the key name and the
encryption context, so a wrong context or a swapped blob fails the way the real sidecar fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.client import AsyncClient, Client, DecryptionFailed, PermissionDenied, envelope
from sidecar.client.envelope import decrypt_bytes, decrypt_file, encrypt_bytes, encrypt_file

SEGMENT = envelope.SEGMENT_SIZE
SEALED_SEGMENT = SEGMENT + 16
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "encrypt_file.py"
PYTHONPATH = os.environ.get("PYTHONPATH", "")


class TransitDouble:
    """Just enough of the sidecar's transit API, with real wrapping, on a Unix socket."""

    def __init__(self, socket_path: str, keys: tuple[str, ...] = ("payments", "other")) -> None:
        self.socket_path = socket_path
        self.keys = keys
        self.keks = {1: AESGCM.generate_key(256)}
        self.datakey_requests = 0
        self._runner: web.AppRunner | None = None

    def rotate(self) -> None:
        self.keks[max(self.keks) + 1] = AESGCM.generate_key(256)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/transit/datakey/{mode}/{name}", self.datakey)
        app.router.add_post("/v1/transit/{op}/{name}", self.transit)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket_path).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def seal(self, name: str, plaintext: bytes, context: Mapping[str, str]) -> str:
        version = max(self.keks)
        nonce = os.urandom(12)
        sealed = AESGCM(self.keks[version]).encrypt(nonce, plaintext, _aad(name, context))
        return f"sidecar:v{version}:" + base64.b64encode(nonce + sealed).decode()

    def open(self, name: str, blob: str, context: Mapping[str, str]) -> bytes:
        _, version, payload = blob.split(":")
        raw = base64.b64decode(payload)
        return AESGCM(self.keks[int(version[1:])]).decrypt(raw[:12], raw[12:], _aad(name, context))

    async def datakey(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await request.json()
        if name not in self.keys:
            return _error(403, "permission_denied", "Permission denied.")
        self.datakey_requests += 1
        items = body.get("batch_input", [body])
        results = []
        for item in items:
            dek = os.urandom(item.get("bits", 256) // 8)
            result: dict[str, Any] = {
                "ciphertext": self.seal(name, dek, item.get("encryption_context", {})),
                "key_version": max(self.keks),
                "expires_at": None,
            }
            if request.match_info["mode"] == "plaintext":
                result["plaintext"] = base64.b64encode(dek).decode()
            results.append(result)
        data = {"batch_results": results} if "batch_input" in body else results[0]
        return web.json_response({"request_id": "r-1", "data": data})

    async def transit(self, request: web.Request) -> web.Response:
        op, name, body = request.match_info["op"], request.match_info["name"], await request.json()
        if name not in self.keys:
            return _error(403, "permission_denied", "Permission denied.")
        context = body.get("encryption_context", {})
        if op == "encrypt":
            blob = self.seal(name, base64.b64decode(body["plaintext"]), context)
            return web.json_response({"data": {"ciphertext": blob, "key_version": max(self.keks)}})
        try:
            plaintext = self.open(name, body["ciphertext"], context)
        except Exception:
            return _error(400, "decryption_failed", "The ciphertext could not be decrypted.")
        if op == "decrypt":
            return web.json_response({"data": {"plaintext": base64.b64encode(plaintext).decode()}})
        blob = self.seal(name, plaintext, context)
        return web.json_response({"data": {"ciphertext": blob, "key_version": max(self.keks)}})


def _aad(name: str, context: Mapping[str, str]) -> bytes:
    return name.encode() + b"\x00" + json.dumps(context, sort_keys=True).encode()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"errors": [message], "code": code, "request_id": "r-e"}, status=status
    )


@pytest.fixture
async def transit() -> AsyncIterator[TransitDouble]:
    with tempfile.TemporaryDirectory(prefix="kms-") as directory:
        double = TransitDouble(os.path.join(directory, "sidecar.sock"))
        await double.start()
        try:
            yield double
        finally:
            await double.stop()


@pytest.fixture
async def client(transit: TransitDouble) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(transit.socket_path) as client:
        yield client


def _header_length(sealed: bytes) -> int:
    return 23 + int.from_bytes(sealed[19:23], "big")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# -- data keys through the client -------------------------------------------------------------


async def test_datakey_opens_again_only_with_its_context(client: AsyncClient) -> None:
    key = await client.datakey("payments", context={"tenant": "acme"})
    assert key.plaintext is not None and len(key.plaintext) == 32
    assert await client.decrypt("payments", key.ciphertext, context={"tenant": "acme"}) == (
        key.plaintext
    )
    with pytest.raises(DecryptionFailed):
        await client.decrypt("payments", key.ciphertext, context={"tenant": "evil"})
    with pytest.raises(DecryptionFailed):
        await client.decrypt("other", key.ciphertext, context={"tenant": "acme"})


async def test_wrapped_datakey_is_opened_by_decrypt(client: AsyncClient) -> None:
    key = await client.datakey("payments", wrapped=True, bits=128)
    assert key.plaintext is None
    assert len(await client.decrypt("payments", key.ciphertext)) == 16


async def test_datakeys_are_distinct_and_each_opens(client: AsyncClient) -> None:
    keys = await client.datakeys("payments", 5)
    assert len({k.plaintext for k in keys}) == 5
    for k in keys:
        assert await client.decrypt("payments", k.ciphertext) == k.plaintext


async def test_datakey_repr_never_shows_the_key(client: AsyncClient) -> None:
    key = await client.datakey("payments")
    assert key.plaintext is not None
    shown = repr(key) + str(key)
    assert "plaintext" not in shown
    assert key.plaintext.hex() not in shown
    assert repr(key.plaintext)[2:-1] not in shown


async def test_encrypt_then_decrypt_and_rewrap(client: AsyncClient, transit: TransitDouble) -> None:
    blob = await client.encrypt("payments", b"card 4111", context={"t": "1"})
    assert blob.startswith("sidecar:v1:")
    transit.rotate()
    moved = await client.rewrap("payments", blob, context={"t": "1"})
    assert moved.startswith("sidecar:v2:")
    assert await client.decrypt("payments", moved, context={"t": "1"}) == b"card 4111"


# -- envelope: bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT])
async def test_bytes_round_trip(client: AsyncClient, size: int) -> None:
    plaintext = os.urandom(size)
    sealed = await encrypt_bytes(client, "payments", plaintext, context={"tenant": "acme"})
    assert size < 16 or plaintext not in sealed
    assert await decrypt_bytes(client, sealed) == plaintext


async def test_header_holds_what_decrypt_needs(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", b"x" * 10, context={"tenant": "acme"})
    assert sealed[:7] == b"KMSENV\x01"
    assert int.from_bytes(sealed[15:19], "big") == SEGMENT
    metadata = json.loads(sealed[23 : _header_length(sealed)])
    assert metadata["key"] == "payments"
    assert metadata["context"] == {"tenant": "acme"}
    assert metadata["blob"].startswith("sidecar:v1:")
    assert len(sealed) == _header_length(sealed) + 10 + 16


async def test_each_encryption_uses_a_fresh_data_key(
    client: AsyncClient, transit: TransitDouble
) -> None:
    first = await encrypt_bytes(client, "payments", b"same")
    second = await encrypt_bytes(client, "payments", b"same")
    assert first != second
    assert transit.datakey_requests == 2


async def test_tampered_byte_anywhere_fails(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", os.urandom(2 * SEGMENT + 100))
    header = _header_length(sealed)
    for at in (6, 10, 17, header + 1, header + SEALED_SEGMENT + 5, len(sealed) - 1):
        with pytest.raises(DecryptionFailed):
            await decrypt_bytes(client, _flip(sealed, at))


async def test_changed_context_in_header_fails(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", b"data", context={"tenant": "acme"})
    forged = sealed.replace(b'"acme"', b'"acmf"')
    assert forged != sealed
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, forged)


async def test_truncation_is_detected(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", os.urandom(3 * SEGMENT))
    header = _header_length(sealed)
    cuts = [
        header,  # no segments at all
        header + SEALED_SEGMENT,  # whole final segments dropped, at a segment boundary
        header + 2 * SEALED_SEGMENT,
        len(sealed) - 1,  # cut inside the last segment
        10,  # cut inside the header
    ]
    for cut in cuts:
        with pytest.raises(DecryptionFailed):
            await decrypt_bytes(client, sealed[:cut])


async def test_reordered_segments_are_detected(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", os.urandom(3 * SEGMENT))
    header = _header_length(sealed)
    s = [sealed[header + i * SEALED_SEGMENT : header + (i + 1) * SEALED_SEGMENT] for i in range(3)]
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, sealed[:header] + s[1] + s[0] + s[2])


async def test_appended_data_is_detected(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", os.urandom(SEGMENT + 5))
    header = _header_length(sealed)
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, sealed + sealed[header : header + SEALED_SEGMENT])
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, sealed + b"\x00")


async def test_segments_of_another_envelope_fail(client: AsyncClient) -> None:
    one = await encrypt_bytes(client, "payments", b"a" * 100)
    two = await encrypt_bytes(client, "payments", b"b" * 100)
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, one[: _header_length(one)] + two[_header_length(two) :])


@pytest.mark.parametrize("junk", [b"", b"hello world", b"KMSENV\x02" + bytes(40), os.urandom(500)])
async def test_not_an_envelope_fails(client: AsyncClient, junk: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, junk)


async def test_expected_key_is_enforced(client: AsyncClient) -> None:
    sealed = await encrypt_bytes(client, "payments", b"data")
    assert await decrypt_bytes(client, sealed, key="payments") == b"data"
    with pytest.raises(DecryptionFailed):
        await decrypt_bytes(client, sealed, key="other")


async def test_sidecar_errors_pass_through(client: AsyncClient) -> None:
    with pytest.raises(PermissionDenied):
        await encrypt_bytes(client, "unknown-key", b"data")


# -- envelope: files ----------------------------------------------------------------------------


async def test_large_file_round_trip_streams_in_bounded_memory(
    client: AsyncClient, tmp_path: Path
) -> None:
    src, sealed, opened = tmp_path / "src.bin", tmp_path / "sealed.kms", tmp_path / "out.bin"
    block = os.urandom(1 << 20)
    with src.open("wb") as f:
        for _ in range(5):
            f.write(block)
        f.write(b"tail")
    del block

    tracemalloc.start()
    try:
        await encrypt_file(client, "payments", src, sealed, context={"tenant": "acme"})
        await decrypt_file(client, sealed, opened)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes for a 5 MiB file"
    assert opened.read_bytes() == src.read_bytes()
    assert sealed.stat().st_size > src.stat().st_size


async def test_failed_decrypt_leaves_dst_untouched_and_no_partial_file(
    client: AsyncClient, tmp_path: Path
) -> None:
    src, sealed, dst = tmp_path / "src", tmp_path / "sealed", tmp_path / "dst"
    src.write_bytes(os.urandom(4 * SEGMENT))
    await encrypt_file(client, "payments", src, sealed)
    data = sealed.read_bytes()
    # Break the last segment: the first three open fine and must never reach dst.
    sealed.write_bytes(_flip(data, len(data) - 3))

    dst.write_bytes(b"previous contents")
    with pytest.raises(DecryptionFailed):
        await decrypt_file(client, sealed, dst)
    assert dst.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["dst", "sealed", "src"]

    dst.unlink()
    with pytest.raises(DecryptionFailed):
        await decrypt_file(client, sealed, dst)
    assert not dst.exists()


async def test_file_opens_with_only_the_file_and_the_sidecar(
    transit: TransitDouble, tmp_path: Path
) -> None:
    src, sealed, opened = tmp_path / "src", tmp_path / "sealed", tmp_path / "opened"
    src.write_bytes(b"ledger\n" * 1000)
    async with AsyncClient(transit.socket_path) as first:
        await encrypt_file(first, "payments", str(src), str(sealed), context={"tenant": "acme"})
    async with AsyncClient(transit.socket_path) as second:
        await decrypt_file(second, sealed, opened, key="payments")
    assert opened.read_bytes() == src.read_bytes()


async def test_file_round_trip_in_place(client: AsyncClient, tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"replace me safely")
    await encrypt_file(client, "payments", path, path)
    assert path.read_bytes()[:6] == b"KMSENV"
    await decrypt_file(client, path, path)
    assert path.read_bytes() == b"replace me safely"


async def test_missing_source_asks_for_no_key(
    client: AsyncClient, transit: TransitDouble, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await encrypt_file(client, "payments", tmp_path / "absent", tmp_path / "out")
    assert transit.datakey_requests == 0


async def test_sync_client_envelope_round_trip(transit: TransitDouble, tmp_path: Path) -> None:
    src, sealed, opened = tmp_path / "src", tmp_path / "sealed", tmp_path / "opened"
    src.write_bytes(os.urandom(2 * SEGMENT + 7))

    def blocking() -> tuple[bytes, bytes]:
        with Client(transit.socket_path) as client:
            envelope.encrypt_file_sync(client, "payments", src, sealed, context={"a": "b"})
            envelope.decrypt_file_sync(client, sealed, opened)
            data = envelope.encrypt_bytes_sync(client, "payments", b"small")
            return opened.read_bytes(), envelope.decrypt_bytes_sync(client, data)

    file_plaintext, bytes_plaintext = await asyncio.to_thread(blocking)
    assert file_plaintext == src.read_bytes()
    assert bytes_plaintext == b"small"

    # The sync and async sides read each other's output.
    async with AsyncClient(transit.socket_path) as client:
        await decrypt_file(client, sealed, opened)
    assert opened.read_bytes() == src.read_bytes()


async def test_example_cli_round_trip(transit: TransitDouble, tmp_path: Path) -> None:
    src, sealed, opened = tmp_path / "src", tmp_path / "sealed", tmp_path / "opened"
    src.write_bytes(b"quarterly numbers\n" * 500)

    async def run(*args: str | Path) -> tuple[int, bytes]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            EXAMPLE,
            *args,
            "--socket",
            transit.socket_path,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), PYTHONPATH])),
            },
        )
        _, stderr = await process.communicate()
        return process.returncode or 0, stderr

    assert await run("encrypt", "--key", "payments", "--context", "t=1", src, sealed) == (0, b"")
    assert await run("decrypt", "--key", "payments", sealed, opened) == (0, b"")
    assert opened.read_bytes() == src.read_bytes()

    code, stderr = await run("decrypt", "--key", "other", sealed, tmp_path / "nope")
    assert code == 1
    assert b"could not be decrypted" in stderr
