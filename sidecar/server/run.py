"""The daemon: every component composed in one place, started in order, stopped in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from sidecar.audit import AuditLog
from sidecar.auth import JwtVerifier
from sidecar.auth.caller import CallerAuthenticator
from sidecar.backends import open_backend
from sidecar.backends.base import RootKeyBackend
from sidecar.config import Config
from sidecar.keys.keyring import Keyring
from sidecar.keys.signing import Signer
from sidecar.kms.server import kms_v2_provider, kms_v2_server
from sidecar.policy.authorizer import PolicyAuthorizer
from sidecar.server.app import build_app
from sidecar.server.connections import (
    BoundedSite,
    ConnectionBounds,
    ConnectionLimits,
    tcp_listener,
)
from sidecar.server.eventloop import loop_name, loop_runner
from sidecar.server.list_verb import ListVerbRequestHandler
from sidecar.server.services import Services
from sidecar.server.socket_access import check_config_sockets, describe_socket_access
from sidecar.telemetry import Metrics, install_tracer_provider
from sidecar.transport.listener import unix_listener
from sidecar.transport.tls import ServerTls

log = logging.getLogger(__name__)


def build_services(config: Config, backend: RootKeyBackend) -> Services:
    """Every component of a sidecar for ``config``, not yet started.

    Raises ``ConfigError`` for bad policy files, JWT settings or audit HMAC key.
    """
    keys = {name: (key, config.root_key_name(name)) for name, key in config.keys.items()}
    keyring = Keyring(backend, keys)
    audit = AuditLog.from_config(config)

    def state() -> dict[str, Any]:
        return {
            "keyring": keyring.status(),
            "backend": backend.status(),
            "audit": dataclasses.asdict(audit.stats()) if audit else None,
        }

    return Services(
        config=config,
        keyring=keyring,
        authenticator=CallerAuthenticator(
            JwtVerifier(config.auth, base_dir=config.base_dir), peercred=config.auth.peercred
        ),
        authorizer=PolicyAuthorizer(
            config.resolve_path(config.policies.dir),
            check=lambda policies: check_config_sockets(config, policies.rules),
        ),
        metrics=Metrics(state),
        audit=audit,
        tracing=isinstance(trace.get_tracer_provider(), TracerProvider),
        signer=Signer(backend, config.root_key_name),
    )


def make_app(services: Services) -> web.Application:
    """The app with its background work attached: opened in order, closed in reverse."""
    app = build_app(services)
    keyring = services.keyring

    async def backend_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await keyring.backend.close()

    async def audit_ctx(_: web.Application) -> AsyncIterator[None]:
        if services.audit is None:
            yield
            return
        await services.audit.open()  # an unwritable path stops start-up, naming it
        yield
        await services.audit.close()  # everything queued is flushed

    async def access_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await services.authenticator.close()
        await services.authorizer.close()

    async def pollers_ctx(_: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(keyring.refresh(name)) for name in keyring.key_names()]
        tasks += [asyncio.create_task(keyring.poll(name)) for name in keyring.key_names()]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.extend([backend_ctx, audit_ctx, access_ctx, pollers_ctx])
    return app


async def serve(
    config: Config,
    *,
    backend: RootKeyBackend | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the sidecar until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and exit.

    SIGHUP reloads the policies, the TLS files and the JWT signing keys; a bad new file keeps the
    old ones.
    """
    stop = stop or asyncio.Event()
    server = config.server
    tracer_provider = install_tracer_provider(config.telemetry)
    services = build_services(config, backend or open_backend(config))
    tls = (
        ServerTls(
            config.resolve_path(server.tls_cert_file),
            config.resolve_path(server.tls_key_file),
            config.resolve_path(server.tls_client_ca_file),
        )
        if server.tcp_address
        else None
    )

    reloads: set[asyncio.Task[None]] = set()

    async def reload_all() -> None:
        await services.authorizer.reload()
        await services.authenticator.reload()  # a withdrawn signing key stops verifying

    def reload() -> None:
        log.info("SIGHUP: reloading policies, TLS files and JWT signing keys")
        if tls is not None:
            tls.reload()
        task = asyncio.create_task(reload_all())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    handlers: dict[signal.Signals, Callable[[], None]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: reload,
    }
    runner = web.AppRunner(
        make_app(services),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=server.drain_timeout,
    )
    loop = asyncio.get_running_loop()
    kms_v2 = contextlib.AsyncExitStack()
    await runner.setup()
    try:
        socket_path = config.resolve_path(server.socket)
        bounds = ConnectionBounds(ConnectionLimits.from_config(server))
        services.metrics.registry.register(bounds.collector())
        backlog = server.listen_backlog
        with unix_listener(
            socket_path, server.socket_mode_bits, server.socket_group, backlog
        ) as sock:
            if config.kms_v2.enabled:  # its own socket, same loop; drained before the audit closes
                provider = kms_v2_provider(
                    config,
                    keyring=services.keyring,
                    authenticator=services.authenticator,
                    authorizer=services.authorizer,
                    metrics=services.metrics,
                    audit=services.audit,
                    tracing=services.tracing,
                )
                await kms_v2.enter_async_context(
                    kms_v2_server(config, provider, drain_timeout=server.drain_timeout)
                )
            site = functools.partial(
                BoundedSite, runner, bounds=bounds, backlog=backlog, handler=ListVerbRequestHandler
            )
            await site(sock).start()
            if tls is not None:
                tcp = tcp_listener(server.tcp_address, backlog)
                await site(tcp, ssl_context=tls.context).start()
            for sig, handler in handlers.items():
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, handler)
            log.info(
                "kms-sidecar ready on %s%s (backend %s, keys: %s, event loop %s)",
                socket_path,
                f" and mTLS {server.tcp_address}" if tls else "",
                services.keyring.backend.kind,
                ", ".join(services.keyring.key_names()) or "none",
                loop_name(loop),
            )
            log.info(describe_socket_access(server.socket_mode_bits, server.socket_group))
            if on_ready:
                on_ready(socket_path)
            await stop.wait()
            log.info("stopping: draining in-flight requests (up to %.0fs)", server.drain_timeout)
            await kms_v2.aclose()
            await runner.cleanup()
    finally:
        await kms_v2.aclose()
        for sig in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports what the batch processor still holds
    log.info("kms-sidecar stopped")


def run(config: Config, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run :func:`serve` on the loop ``KMS_SIDECAR_LOOP`` chooses (see :mod:`.eventloop`)."""
    loop_runner()(serve(config, on_ready=on_ready))
