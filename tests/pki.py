"""A throwaway PKI for mTLS tests: a CA, a server certificate for 127.0.0.1, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.devserver import free_port


@dataclass
class TlsFiles:
    dir: Path
    port: int
    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: ec.EllipticCurvePrivateKey

    def client(
        self,
        name: str,
        *,
        spiffe_id: str | None,
        ca: tuple[x509.Certificate, Any] | None = None,
        expired: bool = False,
    ) -> tuple[Path, Path]:
        """A client certificate and key (files), with ``spiffe_id`` as its URI SAN."""
        issuer_cert, issuer_key = ca or (
            x509.load_pem_x509_certificate(self.ca_cert.read_bytes()),
            self.ca_key,
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = (
            [x509.UniformResourceIdentifier(spiffe_id)] if spiffe_id else [x509.DNSName(name)]
        )
        cert = make_cert(
            name,
            key.public_key(),
            issuer_cert.subject,
            issuer_key,
            sans=sans,
            expired=expired,
            client=True,
        )
        return write_pem(self.dir, name, cert, key)


def make_cert(
    name: str,
    public_key: Any,
    issuer: x509.Name,
    signing_key: Any,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    client: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (
        (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
        if expired
        else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ca:
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
            if client
            else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def write_pem(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def new_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return make_cert(name, key.public_key(), subject, key, ca=True), key


def server_cert(ca_cert: x509.Certificate, ca_key: Any) -> tuple[x509.Certificate, Any]:
    """A server certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert(
        "sidecar",
        key.public_key(),
        ca_cert.subject,
        ca_key,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    return cert, key


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a free port, written into ``directory``."""
    ca_cert, ca_key = new_ca("kms test CA")
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert, key = server_cert(ca_cert, ca_key)
    cert_path, key_path = write_pem(directory, "server", cert, key)
    return TlsFiles(directory, free_port(), directory / "ca.crt", cert_path, key_path, ca_key)
