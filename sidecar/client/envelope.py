"""Envelope encryption of bytes and files, locally, under a fresh data key from the sidecar.

Each call asks the sidecar for one new 256-bit data key (DEK), encrypts locally with AES-256-GCM,
and stores the DEK's blob in the output's header, so opening needs only the output and a sidecar
that may decrypt under the key named there. Files stream in segments: memory stays bounded (a
few segments) whatever the file size. Output is written to a temporary file beside ``dst`` (mode
0600) and renamed over ``dst`` only on success, so a failure never leaves partial output behind.

Many small records: ``encrypt_records`` seals each record under its own single-use key taken
from a key pool (``client.key_pool``), so sealing is local work only; ``decrypt_records`` opens
many sealed records with one ``batch_input`` decrypt request per key name (at most ``batch``
blobs a request). The records are in the same format as ``encrypt_bytes`` output.

Opening fails with ``DecryptionFailed`` for every cause: not this format, a changed header or
segment, segments reordered, removed or added, the file cut short, a wrong key or context. Errors
from the sidecar itself (``PermissionDenied``, ``SidecarUnreachable``, ...) pass through.

Format, version 1 (integers big-endian)::

    offset  size  field
    0       6     magic            b"KMSENV"
    6       1     version          1
    7       8     nonce_prefix     random, fresh per output
    15      4     segment_size     plaintext bytes per segment, 1 .. 1 MiB (written as 65536)
    19      4     metadata_length  1 .. 64 KiB
    23      n     metadata         UTF-8 JSON object, keys sorted, no spaces:
                                   {"blob": "sidecar:v1:...",   the DEK's blob from datakey
                                    "context": {"k": "v"},      encryption context ({} if none)
                                    "key": "payments"}          key name on the sidecar API
    23+n    ...   segments         segment i = AES-256-GCM(DEK, nonce_i, plaintext_i, aad_i),
                                   ciphertext then 16-byte tag

    nonce_i = nonce_prefix || uint32(i)                         (12 bytes)
    aad_i   = header || uint32(i) || uint8(last)                header = bytes 0 .. 23+n
                                                                last = 1 on the final segment

Every segment but the last holds exactly ``segment_size`` plaintext bytes; the last holds 0 ..
``segment_size`` and there is always one (empty input gives one empty final segment). The
header is authenticated by every segment; the context also binds the blob on the sidecar. The
segment index and the final flag in each segment's AAD make reordering and truncation at a
segment boundary fail (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.client._calls import key_segment
from sidecar.client._errors import UnexpectedResponse
from sidecar.errors import DecryptionFailed, InvalidRequest

if TYPE_CHECKING:
    from sidecar.client._calls import DataKey
    from sidecar.client._client import AsyncClient, Client
    from sidecar.client._pool import AsyncKeyPool, KeyPool

StrPath = str | os.PathLike[str]

MAGIC = b"KMSENV"
FORMAT_VERSION = 1
#: Plaintext bytes per segment in what this module writes.
SEGMENT_SIZE = 64 * 1024

_FIXED = struct.Struct(">6sB8sII")  # magic, version, nonce_prefix, segment_size, metadata_length
_NONCE_PREFIX_SIZE = 8
_TAG_SIZE = 16
_DEK_BYTES = 32
_MAX_SEGMENT_SIZE = 1 << 20
_MAX_METADATA = 64 * 1024
_MAX_SEGMENTS = 1 << 32
#: Blobs per decrypt request in ``decrypt_records``: the sidecar's default ``max_batch_items``.
DECRYPT_BATCH = 1000


async def encrypt_bytes(
    client: AsyncClient, key: str, plaintext: bytes, *, context: Mapping[str, str] | None = None
) -> bytes:
    """``plaintext`` sealed under a new data key of ``key``, in the format above."""
    data_key = await client.datakey(key, context=context)
    aead, header = _sealing(data_key, key, context)
    out = io.BytesIO()
    _seal(aead, header, io.BytesIO(plaintext), out)
    return out.getvalue()


async def decrypt_bytes(client: AsyncClient, sealed: bytes, *, key: str | None = None) -> bytes:
    """The plaintext of ``encrypt_bytes`` output; with ``key``, it must name that key."""
    source = io.BytesIO(sealed)
    header = _read_header(source, expected_key=key)
    dek = await client.decrypt(header.key, header.blob, context=header.context or None)
    out = io.BytesIO()
    _open(_aead(dek), header, source, out)
    return out.getvalue()


async def encrypt_file(
    client: AsyncClient,
    key: str,
    src: StrPath,
    dst: StrPath,
    *,
    context: Mapping[str, str] | None = None,
) -> None:
    """Seal the file ``src`` into ``dst`` under a new data key of ``key``; ``dst`` is replaced.

    File work runs in a worker thread, so the event loop is not blocked.
    """
    source = await asyncio.to_thread(open, src, "rb")
    try:
        data_key = await client.datakey(key, context=context)
        aead, header = _sealing(data_key, key, context)
        await asyncio.to_thread(_seal_into, aead, header, source, dst)
    finally:
        source.close()


async def decrypt_file(
    client: AsyncClient, src: StrPath, dst: StrPath, *, key: str | None = None
) -> None:
    """Open the sealed file ``src`` into ``dst``; with ``key``, ``src`` must name that key.

    ``dst`` appears, complete, only if every segment authenticated.
    """
    source = await asyncio.to_thread(open, src, "rb")
    try:
        header = await asyncio.to_thread(_read_header, source, expected_key=key)
        dek = await client.decrypt(header.key, header.blob, context=header.context or None)
        await asyncio.to_thread(_open_into, _aead(dek), header, source, dst)
    finally:
        source.close()


def encrypt_bytes_sync(
    client: Client, key: str, plaintext: bytes, *, context: Mapping[str, str] | None = None
) -> bytes:
    """``encrypt_bytes`` with the blocking ``Client``."""
    aead, header = _sealing(client.datakey(key, context=context), key, context)
    out = io.BytesIO()
    _seal(aead, header, io.BytesIO(plaintext), out)
    return out.getvalue()


def decrypt_bytes_sync(client: Client, sealed: bytes, *, key: str | None = None) -> bytes:
    """``decrypt_bytes`` with the blocking ``Client``."""
    source = io.BytesIO(sealed)
    header = _read_header(source, expected_key=key)
    dek = client.decrypt(header.key, header.blob, context=header.context or None)
    out = io.BytesIO()
    _open(_aead(dek), header, source, out)
    return out.getvalue()


def encrypt_file_sync(
    client: Client,
    key: str,
    src: StrPath,
    dst: StrPath,
    *,
    context: Mapping[str, str] | None = None,
) -> None:
    """``encrypt_file`` with the blocking ``Client``."""
    with open(src, "rb") as source:
        aead, header = _sealing(client.datakey(key, context=context), key, context)
        _seal_into(aead, header, source, dst)


def decrypt_file_sync(
    client: Client, src: StrPath, dst: StrPath, *, key: str | None = None
) -> None:
    """``decrypt_file`` with the blocking ``Client``."""
    with open(src, "rb") as source:
        header = _read_header(source, expected_key=key)
        dek = client.decrypt(header.key, header.blob, context=header.context or None)
        _open_into(_aead(dek), header, source, dst)


async def encrypt_records(pool: AsyncKeyPool, records: Iterable[bytes]) -> list[bytes]:
    """Each record sealed under its own single-use key from ``pool``, in order.

    No request per record: keys come from the pool (``await pool.take()``), AES-GCM is local.
    Each output opens with ``decrypt_bytes``/``decrypt_records`` and names the pool's key and
    context.
    """
    seal = _record_sealer(pool.key, pool.context)
    return [seal(await pool.take(), record) for record in records]


def encrypt_records_sync(pool: KeyPool, records: Iterable[bytes]) -> list[bytes]:
    """``encrypt_records`` with a blocking ``KeyPool``."""
    seal = _record_sealer(pool.key, pool.context)
    take = pool.take
    return [seal(take(), record) for record in records]


async def decrypt_records(
    client: AsyncClient,
    sealed: Sequence[bytes],
    *,
    key: str | None = None,
    batch: int = DECRYPT_BATCH,
) -> list[bytes]:
    """The plaintexts of many sealed records, in order, in one decrypt request per key name
    (per ``batch`` records).

    All or nothing: if any record does not open, ``DecryptionFailed`` (or the sidecar's error
    for the first failing blob) is raised and no plaintext is returned. With ``key``, every
    record must name that key.
    """
    opened = _Opening(sealed, key, batch)
    for name, blobs, contexts in opened.requests():
        opened.deks(await client.decrypt_batch(name, blobs, contexts=contexts))
    return opened.plaintexts()


def decrypt_records_sync(
    client: Client,
    sealed: Sequence[bytes],
    *,
    key: str | None = None,
    batch: int = DECRYPT_BATCH,
) -> list[bytes]:
    """``decrypt_records`` with the blocking ``Client``."""
    opened = _Opening(sealed, key, batch)
    for name, blobs, contexts in opened.requests():
        opened.deks(client.decrypt_batch(name, blobs, contexts=contexts))
    return opened.plaintexts()


def _record_sealer(
    key: str, context: Mapping[str, str] | None
) -> Callable[[DataKey, bytes], bytes]:
    """Seal one record under one data key: ``_sealing`` and ``_seal`` with the constant parts of
    the header (key name, context) encoded once. Byte for byte what ``encrypt_bytes`` writes.
    """
    key_segment(key)
    tail = (
        ',"context":'
        + json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        + ',"key":'
        + json.dumps(key, ensure_ascii=False)
        + "}"
    )
    encode_blob = json.JSONEncoder(ensure_ascii=False).encode
    urandom, pack = os.urandom, _FIXED.pack

    def seal(data_key: DataKey, record: bytes) -> bytes:
        if len(record) > SEGMENT_SIZE:  # more than one segment: the general path
            aead, header = _sealing(data_key, key, context)
            out = io.BytesIO()
            _seal(aead, header, io.BytesIO(record), out)
            return out.getvalue()
        if data_key.plaintext is None or len(data_key.plaintext) != _DEK_BYTES:
            raise UnexpectedResponse("The sidecar did not return a 256-bit data key.")
        metadata = ('{"blob":' + encode_blob(data_key.ciphertext) + tail).encode()
        if len(metadata) > _MAX_METADATA:
            raise ValueError("The key name, blob and context together exceed 64 KiB.")
        nonce_prefix = urandom(_NONCE_PREFIX_SIZE)
        head = pack(MAGIC, FORMAT_VERSION, nonce_prefix, SEGMENT_SIZE, len(metadata)) + metadata
        # One final segment, index 0: nonce = prefix || 0, aad = header || 0 || last.
        sealed = AESGCM(data_key.plaintext).encrypt(
            nonce_prefix + b"\x00\x00\x00\x00", record, head + b"\x00\x00\x00\x00\x01"
        )
        return head + sealed

    return seal


class _Opening:
    """The work of ``decrypt_records``: headers read, blobs grouped by key, DEKs matched back."""

    def __init__(self, sealed: Sequence[bytes], key: str | None, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._batch = batch
        self._sources = [io.BytesIO(blob) for blob in sealed]
        self._headers = [_read_header(source, expected_key=key) for source in self._sources]
        self._by_key: dict[str, list[int]] = {}
        for index, header in enumerate(self._headers):
            self._by_key.setdefault(header.key, []).append(index)
        self._deks: list[bytes | None] = [None] * len(self._headers)
        self._pending: list[int] = []

    def requests(self) -> Iterator[tuple[str, list[str], list[Mapping[str, str] | None]]]:
        for name, indexes in self._by_key.items():
            for at in range(0, len(indexes), self._batch):
                self._pending = indexes[at : at + self._batch]
                headers = [self._headers[i] for i in self._pending]
                yield name, [h.blob for h in headers], [h.context or None for h in headers]

    def deks(self, deks: list[bytes]) -> None:
        for index, dek in zip(self._pending, deks, strict=True):
            self._deks[index] = dek

    def plaintexts(self) -> list[bytes]:
        out = []
        for header, source, dek in zip(self._headers, self._sources, self._deks, strict=True):
            assert dek is not None
            rest = source.read()
            if _TAG_SIZE <= len(rest) <= header.segment_size + _TAG_SIZE:
                # One segment, the final one: what ``_open`` does, without its read-ahead loop.
                try:
                    out.append(_aead(dek).decrypt(_nonce(header, 0), rest, _aad(header, 0, True)))
                except InvalidTag:
                    raise DecryptionFailed(cause="segment 0 failed authentication") from None
                continue
            plaintext = io.BytesIO()
            _open(_aead(dek), header, io.BytesIO(rest), plaintext)
            out.append(plaintext.getvalue())
        return out


@dataclass(frozen=True, slots=True)
class _Header:
    raw: bytes
    nonce_prefix: bytes
    segment_size: int
    key: str
    blob: str
    context: dict[str, str]


def _sealing(
    data_key: DataKey, key: str, context: Mapping[str, str] | None
) -> tuple[AESGCM, _Header]:
    if data_key.plaintext is None or len(data_key.plaintext) != _DEK_BYTES:
        raise UnexpectedResponse("The sidecar did not return a 256-bit data key.")
    metadata = json.dumps(
        {"blob": data_key.ciphertext, "context": dict(context or {}), "key": key},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    if len(metadata) > _MAX_METADATA:
        raise ValueError("The key name, blob and context together exceed 64 KiB.")
    nonce_prefix = os.urandom(_NONCE_PREFIX_SIZE)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, nonce_prefix, SEGMENT_SIZE, len(metadata))
    header = _Header(
        raw=fixed + metadata,
        nonce_prefix=nonce_prefix,
        segment_size=SEGMENT_SIZE,
        key=key,
        blob=data_key.ciphertext,
        context=dict(context or {}),
    )
    return AESGCM(data_key.plaintext), header


def _aead(dek: bytes) -> AESGCM:
    if len(dek) != _DEK_BYTES:
        raise DecryptionFailed(cause="the blob did not hold a 256-bit data key")
    return AESGCM(dek)


def _read_header(source: IO[bytes], *, expected_key: str | None = None) -> _Header:
    """The parsed header of ``source``, leaving it at the first segment."""
    fixed = _read_full(source, _FIXED.size)
    if len(fixed) != _FIXED.size:
        raise DecryptionFailed(cause="shorter than a header")
    magic, version, nonce_prefix, segment_size, metadata_length = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise DecryptionFailed(cause="not a kms-sidecar envelope")
    if version != FORMAT_VERSION:
        raise DecryptionFailed(cause=f"unsupported envelope version {version}")
    if not 1 <= segment_size <= _MAX_SEGMENT_SIZE or not 1 <= metadata_length <= _MAX_METADATA:
        raise DecryptionFailed(cause="header sizes out of range")
    raw_metadata = _read_full(source, metadata_length)
    if len(raw_metadata) != metadata_length:
        raise DecryptionFailed(cause="header cut short")
    try:
        metadata = json.loads(raw_metadata.decode())
    except (UnicodeDecodeError, ValueError):
        raise DecryptionFailed(cause="header metadata is not JSON") from None
    if not isinstance(metadata, dict) or set(metadata) != {"blob", "context", "key"}:
        raise DecryptionFailed(cause="header metadata has the wrong fields")
    key, blob, context = metadata["key"], metadata["blob"], metadata["context"]
    if (
        not isinstance(key, str)
        or not isinstance(blob, str)
        or not isinstance(context, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
    ):
        raise DecryptionFailed(cause="header metadata has the wrong types")
    try:
        key_segment(key)
    except InvalidRequest:
        raise DecryptionFailed(cause="header names an impossible key") from None
    if expected_key is not None and key != expected_key:
        raise DecryptionFailed(cause="sealed under another key")
    return _Header(fixed + raw_metadata, nonce_prefix, segment_size, key, blob, context)


def _seal(aead: AESGCM, header: _Header, source: IO[bytes], out: IO[bytes]) -> None:
    out.write(header.raw)
    index = 0
    chunk = _read_full(source, header.segment_size)
    while True:
        # Reading one segment ahead is how we learn whether this one is the last.
        following = _read_full(source, header.segment_size)
        last = not following
        out.write(aead.encrypt(_nonce(header, index), chunk, _aad(header, index, last)))
        if last:
            return
        index += 1
        if index >= _MAX_SEGMENTS:
            raise ValueError("The input is too large for one envelope (2^32 segments).")
        chunk = following


def _open(aead: AESGCM, header: _Header, source: IO[bytes], out: IO[bytes]) -> None:
    sealed_size = header.segment_size + _TAG_SIZE
    index = 0
    chunk = _read_full(source, sealed_size)
    while True:
        following = _read_full(source, sealed_size)
        last = not following
        if len(chunk) < _TAG_SIZE or index >= _MAX_SEGMENTS:
            raise DecryptionFailed(cause=f"segment {index} cut short")
        try:
            out.write(aead.decrypt(_nonce(header, index), chunk, _aad(header, index, last)))
        except InvalidTag:
            raise DecryptionFailed(cause=f"segment {index} failed authentication") from None
        if last:
            return
        index += 1
        chunk = following


def _seal_into(aead: AESGCM, header: _Header, source: IO[bytes], dst: StrPath) -> None:
    with _replacing(dst) as out:
        _seal(aead, header, source, out)


def _open_into(aead: AESGCM, header: _Header, source: IO[bytes], dst: StrPath) -> None:
    with _replacing(dst) as out:
        _open(aead, header, source, out)


@contextlib.contextmanager
def _replacing(dst: StrPath) -> Iterator[IO[bytes]]:
    """A temporary file beside ``dst`` that replaces it if the block succeeds, else vanishes."""
    target = os.path.abspath(os.fspath(dst))
    directory, name = os.path.split(target)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename durable; some filesystems refuse to fsync a directory, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _nonce(header: _Header, index: int) -> bytes:
    return header.nonce_prefix + index.to_bytes(4, "big")


def _aad(header: _Header, index: int, last: bool) -> bytes:
    return header.raw + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _read_full(source: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of input."""
    parts = []
    remaining = size
    while remaining:
        part = source.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)
