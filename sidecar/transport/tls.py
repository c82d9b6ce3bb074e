"""The mTLS listener's TLS: 1.3 only, a client certificate required, reloadable on SIGHUP."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from cryptography import x509

from sidecar.errors import ConfigError
from sidecar.identity import TlsPeer

log = logging.getLogger(__name__)


class ServerTls:
    """The server's TLS context; ``reload`` swaps in new files for new handshakes.

    The context handed to the listener never changes; its SNI callback points each handshake at
    the current inner context, so a reload needs no restart and drops no connection.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str) -> None:
        self._files = (cert_file, key_file, client_ca_file)
        self._current = self._build()
        self.context = self._build()
        self.context.sni_callback = self._select

    def _build(self) -> ssl.SSLContext:
        cert_file, key_file, ca_file = self._files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(cert_file, key_file)
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"server.tls_*: cannot load {cert_file}, {key_file} or {ca_file}: {exc}"
            ) from None
        return context

    def _select(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self._current

    def reload(self) -> bool:
        """Load the files again; on failure keep the old ones and log why. True if reloaded."""
        try:
            self._current = self._build()
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the previous certificates: %s", exc)
            return False
        log.info("TLS certificates reloaded")
        return True


def tls_peer(ssl_object: Any) -> TlsPeer | None:
    """The verified client certificate's SPIFFE ID (first ``spiffe://`` URI SAN) and subject."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    spiffe_id = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        uris = [
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("spiffe://")
        ]
        spiffe_id = uris[0] if uris else None
    return TlsPeer(spiffe_id=spiffe_id, subject=cert.subject.rfc4514_string())
