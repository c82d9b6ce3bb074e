"""The daemon: every component composed in one place, started in order, stopped in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from sidecar.backends import open_backend
from sidecar.backends.base import RootKeyBackend
from sidecar.config import Config
from sidecar.errors import PermissionDenied, Unauthenticated
from sidecar.identity import Identity
from sidecar.keys.keyring import Keyring
from sidecar.server.app import Services, build_app
from sidecar.server.listener import unix_listener

log = logging.getLogger(__name__)


class PeerAuthenticator:
    """Identity from the Unix peer alone; a bearer token is refused, never ignored."""

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        if token is not None:
            raise Unauthenticated(
                "This sidecar does not accept tokens; unset BAO_TOKEN/VAULT_TOKEN or the "
                "Authorization header and connect over the Unix socket."
            )
        return connection


class OwnerOnly:
    """Allows the sidecar's own uid and root, and no one else."""

    def __init__(self, uid: int | None = None) -> None:
        self._uids = {0, os.getuid() if uid is None else uid}

    def authorize(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None = None,
        ttl: float | None = None,
    ) -> str:
        if identity.peer is None or identity.peer.uid not in self._uids:
            raise PermissionDenied()
        return "owner"


def build_services(config: Config, backend: RootKeyBackend) -> Services:
    keys = {name: (key, config.root_key_name(name)) for name, key in config.keys.items()}
    return Services(
        config=config,
        keyring=Keyring(backend, keys),
        authenticator=PeerAuthenticator(),
        authorizer=OwnerOnly(),
    )


def make_app(services: Services) -> web.Application:
    """The app with its background work attached: opened in order, closed in reverse."""
    app = build_app(services)
    keyring = services.keyring

    async def backend_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await keyring.backend.close()

    async def pollers_ctx(_: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(keyring.refresh(name)) for name in keyring.key_names()]
        tasks += [asyncio.create_task(keyring.poll(name)) for name in keyring.key_names()]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.extend([backend_ctx, pollers_ctx])
    return app


async def serve(
    config: Config,
    *,
    backend: RootKeyBackend | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the sidecar until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and exit."""
    stop = stop or asyncio.Event()
    services = build_services(config, backend or open_backend(config))
    runner = web.AppRunner(
        make_app(services),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.server.drain_timeout,
    )
    loop = asyncio.get_running_loop()
    await runner.setup()
    try:
        with unix_listener(
            config.server.socket, config.server.socket_mode_bits, config.server.socket_group
        ) as sock:
            await web.SockSite(runner, sock).start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            log.info(
                "kms-sidecar ready on %s (backend %s, keys: %s)",
                config.server.socket,
                services.keyring.backend.kind,
                ", ".join(services.keyring.key_names()) or "none",
            )
            if on_ready:
                on_ready(config.server.socket)
            await stop.wait()
            log.info(
                "stopping: draining in-flight requests (up to %.0fs)", config.server.drain_timeout
            )
            await runner.cleanup()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("kms-sidecar stopped")


def run(config: Config, **kwargs: object) -> None:
    """Run :func:`serve` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, **kwargs))  # type: ignore[arg-type]
    else:
        uvloop.run(serve(config, **kwargs))  # type: ignore[arg-type]
