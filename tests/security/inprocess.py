"""The sidecar's app in process over a :class:`MemoryBackend`, for fast hostile-input suites.

The app is the one ``kms-sidecar run`` serves (``make_app``, pollers and all), driven by
aiohttp's test client on one event loop that a sync test can call into. The connection is TCP
loopback, so there are no peer credentials; :class:`AsPeer` lends every request the identity a
Unix peer of this uid would have, and still verifies any token the request presents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.backends.memory import MemoryBackend
from sidecar.identity import Identity, PeerCredentials
from sidecar.server.run import build_services, make_app
from sidecar.server.services import Authenticator
from tests.conftest import sidecar_config

#: Root keys of the in-process sidecar: a symmetric key and a signing key.
KEY_TYPES = {"payments": "aes256", "signer": "ec-p256"}


class AsPeer:
    """Every request's connection is a Unix peer of this process's uid."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner
        self.peer = PeerCredentials(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        return await self.inner.identify(dataclasses.replace(connection, peer=self.peer), token)

    async def reload(self) -> None:
        await self.inner.reload()

    async def close(self) -> None:
        await self.inner.close()


class Records(logging.Handler):
    """Every log record at WARNING or above, and every one carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append(record)

    def errors(self) -> list[str]:
        """What was logged at ERROR or with a traceback (which no caller may cause)."""
        return [
            f"{r.levelname} {r.getMessage()}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info
        ]


@dataclasses.dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    raw: bytes


class InProcessSidecar:
    """A running in-process sidecar; :meth:`request` is synchronous."""

    def __init__(self, directory: Path, **sections: Any) -> None:
        self.backend = MemoryBackend(KEY_TYPES)
        config = sidecar_config(
            directory / "sidecar.sock",
            keys={name: {} for name in KEY_TYPES},
            **sections,
        )
        services = build_services(config, self.backend)
        services = dataclasses.replace(services, authenticator=AsPeer(services.authenticator))
        self.loop = asyncio.new_event_loop()
        try:
            self.client = self.loop.run_until_complete(self._start(make_app(services)))
        except BaseException:
            self.loop.close()
            raise
        self.records = Records()
        logging.getLogger().addHandler(self.records)

    async def _start(self, app: web.Application) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        try:
            await self._refreshed()
        except BaseException:
            await client.close()
            raise
        return client

    async def _refreshed(self) -> None:
        """Wait until the start-up metadata read ran (as it does before a real sidecar serves)."""
        for _ in range(400):
            if self.backend.calls["key_info"] >= len(KEY_TYPES):
                await asyncio.sleep(0.01)  # let the readers apply what they read
                return
            await asyncio.sleep(0.005)
        raise TimeoutError("the key metadata was never read")

    def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        async def send() -> Reply:
            async with self.client.request(
                method, path, data=data, headers=dict(headers or {}), allow_redirects=False
            ) as resp:
                return Reply(resp.status, dict(resp.headers), await resp.read())

        return self.loop.run_until_complete(send())

    def keks(self) -> list[bytes]:
        """Every KEK the backend made (the test double keeps them in the clear)."""
        return [plaintext for _, _, plaintext in self.backend._keks.values()]

    def close(self) -> None:
        logging.getLogger().removeHandler(self.records)
        self.loop.run_until_complete(self.client.close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def in_process_sidecar(directory: Path, **sections: Any) -> Iterator[InProcessSidecar]:
    """A generator for a fixture: the sidecar, closed after the last test using it."""
    sidecar = InProcessSidecar(directory, **sections)
    try:
        yield sidecar
    finally:
        sidecar.close()
