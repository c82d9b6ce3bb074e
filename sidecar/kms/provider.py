"""kube-apiserver's KMS v2 plugin API (``Status``, ``Encrypt``, ``Decrypt``) over the keyring.

The apiserver makes a DEK seed per key id, asks ``Encrypt`` to seal it, keeps the sealed seed
beside every object it writes, and asks ``Decrypt`` for the seed when it reads an object whose
seed it does not hold. Here:

- ``Encrypt`` seals the plaintext (a 32-byte seed from current apiservers) as a blob under the
  configured key's live KEK: no upstream call while the KEK lives. The ciphertext is the blob's
  text (``sidecar:v<root_version>:...``), at most :data:`MAX_CIPHERTEXT_BYTES`; no annotations.
- ``Decrypt`` opens any blob of that key, older root versions included; concurrent requests for
  one KEK share one backend unwrap. A wrong or tampered ciphertext is ``INVALID_ARGUMENT``.
  ``vault:vN:...`` ciphertexts (what a plugin that called transit directly stored) go to the
  upstream transit key, so a cluster can move to the sidecar without re-encrypting first.
- ``Status`` answers ``version`` ``"v2"``, ``healthz`` ``"ok"`` only if the key can seal right now
  (it seals an empty probe: within ``upstream_grace`` of an outage it still can), and ``key_id``
  (:func:`key_id_for`): the root key and its latest version, never a local KEK. The apiserver
  marks data stored under another key id stale and makes a new seed when the key id changes.

Every call is made by a caller identified by its Unix peer credentials alone (the apiserver sends
no token) and authorized *before its message is read* as the policy operation ``encrypt``
(``Status`` and ``Encrypt``) or ``decrypt`` on the key. Each call leaves one audit record
(operation ``status``, ``encrypt`` or ``decrypt``), one count in ``kms_requests`` (operations
``kms_v2_status``, ``kms_v2_encrypt``, ``kms_v2_decrypt``) and, when tracing, one server span
named after the gRPC method, child of the apiserver's ``traceparent`` if it sent one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

from grpclib import GRPCError
from grpclib.const import Status as GrpcStatus
from grpclib.server import Stream
from opentelemetry import propagate, trace

from sidecar.audit import AuditLog, audit_record
from sidecar.errors import (
    AuditUnavailable,
    DecryptionFailed,
    InternalError,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SidecarError,
    Unauthenticated,
    UpstreamUnavailable,
)
from sidecar.identity import Identity
from sidecar.keys.keyring import Keyring
from sidecar.kms.v2 import api_pb2
from sidecar.kms.v2.api_grpc import KeyManagementServiceBase
from sidecar.policy.authorizer import AccessRequest
from sidecar.telemetry import Metrics, request_id_var
from sidecar.tracing import tracer
from sidecar.transport.identities import ConnectionIdentities

log = logging.getLogger(__name__)

API_VERSION = "v2"
HEALTHY = "ok"
#: The apiserver's limits (k8s.io/apiserver kmsv2: encryptedDEKSourceMaxSize, KeyIDMaxSize).
MAX_CIPHERTEXT_BYTES = 1024
MAX_KEY_ID_BYTES = 1024
#: The largest plaintext ``Encrypt`` takes. Apiservers send 32 bytes (a seed or an AES key);
#: this leaves room for larger ones while the ciphertext stays within its limit.
MAX_PLAINTEXT_BYTES = 512
SERVICE = "v2.KeyManagementService"

#: The only map from error code to gRPC status (the HTTP one is in ``server/errors.py``).
GRPC_STATUS_BY_CODE: Mapping[str, GrpcStatus] = {
    "invalid_request": GrpcStatus.INVALID_ARGUMENT,
    "payload_too_large": GrpcStatus.INVALID_ARGUMENT,
    "decryption_failed": GrpcStatus.INVALID_ARGUMENT,
    "unauthenticated": GrpcStatus.UNAUTHENTICATED,
    "permission_denied": GrpcStatus.PERMISSION_DENIED,
    "rate_limited": GrpcStatus.RESOURCE_EXHAUSTED,
    "upstream_error": GrpcStatus.INTERNAL,
    "upstream_unavailable": GrpcStatus.UNAVAILABLE,
    "audit_unavailable": GrpcStatus.UNAVAILABLE,
    "internal": GrpcStatus.INTERNAL,
}


class ShuttingDown(UpstreamUnavailable):
    """The sidecar is draining: it finishes calls in flight and takes no new ones."""

    default_message = "The sidecar is shutting down; retry on its successor."


class Authenticator(Protocol):
    """What the KMS provider needs of the sidecar's authenticator (no token is ever passed)."""

    async def identify(self, connection: Identity, token: str | None) -> Identity: ...


class Authorizer(Protocol):
    """What the KMS provider needs of the sidecar's authorizer: the allowing rule's name, or
    ``PermissionDenied``/``RateLimited`` naming the refusing rule."""

    def authorize(self, access: AccessRequest) -> str: ...


def key_id_for(root_key_label: str, root_version: int) -> str:
    """The ``key_id`` of a root key at a version: ``<backend>:<where>/<root key>:v<version>``.

    ``root_key_label`` says which backend and which key (``vault:transit/etcd``,
    ``pkcs11:kms/etcd``), so it is the same for every sidecar on the same upstream and across
    restarts, and changes only when the root key's latest version does.
    """
    return f"{root_key_label}:v{root_version}"


class _Done(NamedTuple):
    """What one call did: its reply, and which root version and KEK did it."""

    reply: Any
    root_version: int | None = None
    kek_id: bytes | None = None


class _Result(NamedTuple):
    """One call's decision and outcome, for its audit record, metrics, span and answer."""

    identity: Identity | None
    rule: str | None
    done: _Done | None
    error: SidecarError | None


_Run = Callable[[Any], Awaitable[_Done]]


class KmsV2Provider(KeyManagementServiceBase):
    """The KMS v2 service for one key, served by :func:`sidecar.kms.server.kms_v2_server`.

    ``root_key_label`` names the backend and root key for :func:`key_id_for`.
    """

    def __init__(
        self,
        *,
        key_name: str,
        root_key_label: str,
        keyring: Keyring,
        authenticator: Authenticator,
        authorizer: Authorizer,
        metrics: Metrics,
        audit: AuditLog | None = None,
        tracing: bool = False,
    ) -> None:
        self.key_name = key_name
        self.root_key_label = root_key_label
        self._keyring = keyring
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._metrics = metrics
        self._audit = audit
        self._tracing = tracing
        self._connections = ConnectionIdentities()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    # -- the three methods ------------------------------------------------------------------

    async def Status(  # the gRPC method's name
        self, stream: Stream[api_pb2.StatusRequest, api_pb2.StatusResponse]
    ) -> None:
        await self._serve(stream, "Status", "status", "encrypt", self._status)

    async def Encrypt(
        self, stream: Stream[api_pb2.EncryptRequest, api_pb2.EncryptResponse]
    ) -> None:
        await self._serve(stream, "Encrypt", "encrypt", "encrypt", self._encrypt)

    async def Decrypt(
        self, stream: Stream[api_pb2.DecryptRequest, api_pb2.DecryptResponse]
    ) -> None:
        await self._serve(stream, "Decrypt", "decrypt", "decrypt", self._decrypt)

    async def _status(self, _: api_pb2.StatusRequest) -> _Done:
        healthz, probe = HEALTHY, None
        try:  # "ok" means the key can seal now: seal an empty probe and see
            probe = await self._keyring.encrypt(self.key_name, b"")
        except SidecarError as exc:
            healthz = exc.message
        audit = self._audit
        if healthz == HEALTHY and audit is not None and audit.fail_closed and not audit.healthy:
            healthz = AuditUnavailable.default_message
        latest = self._keyring.status().keys[self.key_name].latest_version or 0
        if probe is not None:
            latest = max(latest, probe.root_version)
        key_id = key_id_for(self.root_key_label, latest) if latest else ""
        reply = api_pb2.StatusResponse(version=API_VERSION, healthz=healthz, key_id=key_id)
        return _Done(reply, latest or None, probe.kek_id if probe else None)

    async def _encrypt(self, request: api_pb2.EncryptRequest) -> _Done:
        plaintext = request.plaintext
        if not plaintext:
            raise InvalidRequest("The plaintext is empty.")
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise InvalidRequest(
                f"The plaintext is {len(plaintext)} bytes; the limit is {MAX_PLAINTEXT_BYTES}."
            )
        sealed = await self._keyring.encrypt(self.key_name, plaintext)
        ciphertext = sealed.blob.encode("ascii")
        if len(ciphertext) > MAX_CIPHERTEXT_BYTES:  # a backend with very long wrapped KEKs
            raise InternalError()
        key_id = key_id_for(self.root_key_label, sealed.root_version)
        reply = api_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id)
        return _Done(reply, sealed.root_version, sealed.kek_id)

    async def _decrypt(self, request: api_pb2.DecryptRequest) -> _Done:
        ciphertext = request.ciphertext
        if not ciphertext or len(ciphertext) > MAX_CIPHERTEXT_BYTES:
            raise DecryptionFailed("ciphertext empty or over 1 KiB")
        try:
            blob = ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionFailed("ciphertext is not a blob") from None
        opened = await self._keyring.open_blob(self.key_name, blob)
        return _Done(
            api_pb2.DecryptResponse(plaintext=opened.plaintext), opened.root_version, opened.kek_id
        )

    # -- what every call shares ---------------------------------------------------------------

    async def _serve(
        self, stream: Stream[Any, Any], method: str, operation: str, permission: str, run: _Run
    ) -> None:
        """Identify, authorize, read, run, audit, count and trace one call; then answer it."""
        request_id = str(uuid.uuid4())
        log_token = request_id_var.set(request_id)
        started = time.perf_counter()
        self._enter()
        try:
            with self._span(stream, method) as span:
                result = await self._run(stream, method, permission, run)
                if self._audit is not None:
                    result = await self._audited(
                        result, request_id, _trace_id(span, stream), operation
                    )
                outcome = "ok" if result.error is None else result.error.code
                self._metrics.observe(f"kms_v2_{operation}", outcome, time.perf_counter() - started)
                if span is not None:
                    _end_span(span, request_id, operation, self.key_name, result, outcome)
            if result.error is not None:
                status = GRPC_STATUS_BY_CODE.get(result.error.code, GrpcStatus.INTERNAL)
                raise GRPCError(status, f"{result.error.message} (request id {request_id})")
            assert result.done is not None
            await stream.send_message(result.done.reply)
        finally:
            self._leave()
            request_id_var.reset(log_token)

    async def _run(
        self, stream: Stream[Any, Any], method: str, permission: str, run: _Run
    ) -> _Result:
        identity: Identity | None = None
        rule: str | None = None
        try:
            if self._draining:
                raise ShuttingDown()
            identity = await self._identify(stream)
            rule = self._authorize(identity, permission)
            request = await stream.recv_message()  # only an allowed caller's bytes are read
            return _Result(identity, rule, await run(request), None)
        except SidecarError as exc:
            if isinstance(exc, PermissionDenied | RateLimited):
                rule = exc.rule
            return _Result(identity, rule, None, exc)
        except Exception:
            log.exception("internal error in KMS v2 %s", method)
            return _Result(identity, rule, None, InternalError())

    async def _audited(
        self, result: _Result, request_id: str, trace_id: str | None, operation: str
    ) -> _Result:
        """``result`` once its record is written; an ``AuditUnavailable`` failure if it can't be
        (with ``audit.fail_closed``), so nothing is answered unaudited."""
        assert self._audit is not None
        error, done = result.error, result.done
        denied = isinstance(error, Unauthenticated | PermissionDenied | RateLimited)
        record = audit_record(
            time=time.time(),
            request_id=request_id,
            trace_id=trace_id,
            identity=result.identity,
            rule=result.rule,
            operation=operation,
            key=self.key_name,
            root_version=done.root_version if done else None,
            kek_id=done.kek_id.hex() if done and done.kek_id else None,
            outcome="ok" if error is None else "denied" if denied else "error",
            error_code=None if error is None else error.code,
            context=None,
            hmac_key=self._audit.hmac_key,
            cause=error.cause if isinstance(error, DecryptionFailed) else None,
        )
        try:
            await self._audit.write(record)
        except AuditUnavailable as exc:
            return result._replace(done=None, error=exc)
        return result

    async def _identify(self, stream: Stream[Any, Any]) -> Identity:
        """The caller's peer credentials, read once per connection, as the authenticator sees
        them (it drops them when ``auth.peercred`` is off)."""
        connection = self._connections.identity(_transport(stream))
        return await self._authenticator.identify(connection, None)

    def _authorize(self, identity: Identity, operation: str) -> str:
        return self._authorizer.authorize(AccessRequest(identity, self.key_name, operation))

    @contextmanager
    def _span(self, stream: Stream[Any, Any], method: str) -> Iterator[trace.Span | None]:
        if not self._tracing:
            yield None
            return
        parent = propagate.extract(_text_metadata(stream))
        with tracer.start_as_current_span(
            f"{SERVICE}/{method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        ) as span:
            yield span

    # -- draining -----------------------------------------------------------------------------

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        """Calls being handled now."""
        return self._in_flight

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls (``UNAVAILABLE``) and wait up to ``timeout`` seconds for the calls in
        flight to finish. Returns whether they all did."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("KMS v2: %d calls still in flight after the drain", self._in_flight)
            return False
        finally:
            self._close_connections()
        return True

    def _close_connections(self) -> None:
        """Close the connections calls came on: grpclib's server stops listening and cancels its
        handlers, but leaves open connections to the event loop's end."""
        for transport in self._connections.open_transports():
            transport.close()


def _transport(stream: Stream[Any, Any]) -> Any:
    """The connection's asyncio transport. grpclib exposes a connection's peer only through
    ``Peer.addr()`` and ``Peer.cert()``, and a Unix peer's address is empty, so the peer
    credentials are read from the socket under ``Peer``'s transport (grpclib 0.4.x); a test pins
    this."""
    return getattr(stream.peer, "_transport", None)


def _text_metadata(stream: Stream[Any, Any]) -> dict[str, str]:
    metadata: Mapping[str, Any] = stream.metadata or {}
    return {k: v for k, v in metadata.items() if isinstance(v, str)}


def _trace_id(span: trace.Span | None, stream: Stream[Any, Any]) -> str | None:
    """The trace this call belongs to: its span's, else the caller's ``traceparent``'s, so audit
    records join the apiserver's trace even when the sidecar records no spans."""
    if span is None:
        span = trace.get_current_span(propagate.extract(_text_metadata(stream)))
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _end_span(
    span: trace.Span, request_id: str, operation: str, key_name: str, result: _Result, outcome: str
) -> None:
    identity, done = result.identity, result.done
    attributes: dict[str, str | int] = {
        "kms.request_id": request_id,
        "kms.operation": operation,
        "kms.key": key_name,
        "kms.outcome": outcome,
        "kms.identity.kind": identity.kind if identity else "anonymous",
        "kms.rule": result.rule or "",
    }
    if done is not None and done.root_version is not None:
        attributes["kms.root_version"] = done.root_version
    if done is not None and done.kek_id is not None:
        attributes["kms.kek_id"] = done.kek_id.hex()
    span.set_attributes(attributes)
    span.add_event("audit", attributes)
    if outcome != "ok":
        span.set_status(trace.StatusCode.ERROR, outcome)


def root_key_label(backend_kind: str, where: str, root_key: str) -> str:
    """``<backend>:<where>/<root key>``: ``where`` is the transit mount or the HSM token label."""
    return f"{backend_kind}:{where}/{root_key}"


__all__ = [
    "API_VERSION",
    "GRPC_STATUS_BY_CODE",
    "MAX_CIPHERTEXT_BYTES",
    "KmsV2Provider",
    "key_id_for",
    "root_key_label",
]
