"""The self-hosted plane's own certificate authority and server certificates.

Why: atProtocol clients (the Python SDK uses `ssl.create_default_context()`, Dart uses the
system store) verify the atDirectory and atServer certificates against a CA bundle and the
hostname they dialled. A self-hosted plane therefore needs a CA whose certificate clients can
trust (via SSL_CERT_FILE or the system store) and server certificates whose SANs name every
host/IP the servers are reached at. Server certificates are also presented as *client*
certificates in server-to-server connections (docs/reference/atprotocol.md#outbound-connections,
docs/reference/atprotocol.md#client-certificate-check), so they carry both the
serverAuth and clientAuth extended key usages.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography.x509 (and the email package under it) is imported by the functions that make or
# read certificates, not here: client_context() is on every daemon's and client's start-up path
# and needs only ssl (docs/sshnpd.md "Memory").

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"  # leaf + CA (fullchain)
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one plane's TLS material (all in one directory)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def key(self) -> Path:
        return self.directory / SERVER_KEY

    def exists(self) -> bool:
        return self.ca_cert.exists() and self.cert.exists() and self.key.exists()


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(directory: Path, common_name: str = "noports self-hosted plane CA",
              days: int = 3650) -> TlsFiles:
    """Create a CA in `directory` unless one is there already (idempotent)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    files = TlsFiles(Path(directory))
    if files.ca_cert.exists() and files.ca_key.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.ca_key, _key_pem(key))
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def issue_server_cert(directory: Path, names: list[str], days: int = 825) -> TlsFiles:
    """Issue (or re-issue) the server certificate for `names` (DNS names and/or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = TlsFiles(Path(directory))
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, _key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                           + ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def ensure_plane_tls(directory: Path, names: list[str]) -> TlsFiles:
    """CA + server certificate covering `names`; re-issues the leaf if a name is missing."""
    from cryptography import x509

    files = create_ca(directory)
    if files.cert.exists() and files.key.exists():
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
            have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            have = set()
        if set(names) <= have:
            return files
    return issue_server_cert(directory, names)


def server_context(files: TlsFiles, request_client_cert: bool = True) -> ssl.SSLContext:
    """TLS server context; client certs are requested but optional (docs/reference/atprotocol.md#tls-and-connection-lifecycle)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    if request_client_cert:
        ctx.load_verify_locations(cafile=str(files.ca_cert))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: Path | None = None, cert_files: TlsFiles | None = None) -> ssl.SSLContext:
    """TLS client context trusting `ca_file` (and the system store when it is None).

    With `cert_files`, presents the server certificate as a client certificate, as atServers do
    when they connect to each other.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_files is not None:
        ctx.load_cert_chain(str(cert_files.cert), str(cert_files.key))
    return ctx
