"""An in-process sidecar for the server's unit tests: aiohttp's test client over MemoryBackend.

The app is the one ``kms-sidecar run`` serves (``make_app``: audit opened and closed in its
cleanup context); only the authenticator is a stub that hands out a fixed identity, because the
test client connects over loopback TCP, where there are no peer credentials to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from sidecar.backends.memory import MemoryBackend
from sidecar.errors import Unauthenticated
from sidecar.identity import Identity, JwtClaims, PeerCredentials
from sidecar.server.run import build_services, make_app
from sidecar.server.services import Services
from tests.conftest import sidecar_config

HMAC_KEY = b"k" * 32
CALLER = Identity(peer=PeerCredentials(uid=4242, gid=4242, pid=1, exe="/usr/bin/app"))

#: Everything for uid 4242, as `kms-sidecar dev` writes it for its user.
ALLOW_ALL = """
[[allow]]
name = "everything"
when.unix_uid = [4242]
keys = ["*"]
operations = ["*"]
"""


class StubAuthenticator:
    """``CALLER`` for every request; ``Bearer bad`` is refused, ``Bearer <sub>`` adds a JWT."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.reloads = 0
        #: Set once a request has been authenticated (its body is read next).
        self.called = asyncio.Event()

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        self.called.set()
        if token is None:
            return self.identity
        if token == "bad":
            raise Unauthenticated("The token was refused: bad signature.")
        return dataclasses.replace(self.identity, jwt=JwtClaims("https://issuer", token))

    async def reload(self) -> None:
        self.reloads += 1

    async def close(self) -> None:
        pass


@dataclasses.dataclass
class Sidecar:
    client: TestClient[Any, Any]
    services: Services
    backend: MemoryBackend
    audit_path: Path
    authenticator: StubAuthenticator

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        async with self.client.request(method, path, data=data, headers=headers) as answer:
            raw = await answer.read()
            return answer.status, json.loads(raw) if raw else {}

    def records(self) -> list[dict[str, Any]]:
        """The request records written so far (durable: the log is fail-closed)."""
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [r for r in map(json.loads, lines) if r.get("event") == "request"]


@asynccontextmanager
async def sidecar(
    tmp_path: Path,
    *,
    policy: str = ALLOW_ALL,
    identity: Identity = CALLER,
    keys: Mapping[str, str] | None = None,
    **sections: Any,
) -> AsyncIterator[Sidecar]:
    """A sidecar with ``policy``, keys (name → type; default one AES key ``payments``) and an
    audit log in ``tmp_path``; ``sections`` are merged into the config."""
    keys = dict(keys or {"payments": "aes256"})
    audit_path = tmp_path / "audit.log"
    sections.setdefault("audit", {})
    sections["audit"].setdefault("path", str(audit_path))
    config = sidecar_config(
        tmp_path / "s.sock", policy=policy, keys={name: {} for name in keys}, **sections
    )
    backend = MemoryBackend(keys)
    services = build_services(config, backend)
    if services.audit is not None:
        services.audit.hmac_key = HMAC_KEY
    authenticator = StubAuthenticator(identity)
    services = dataclasses.replace(services, authenticator=authenticator)
    async with TestClient(TestServer(make_app(services))) as client:
        yield Sidecar(client, services, backend, audit_path, authenticator)
