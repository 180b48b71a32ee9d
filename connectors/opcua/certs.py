"""Application instance certificates for OPC UA (client or server): an RSA key and a
self-signed X.509 certificate carrying the application URI, as OPC 10000-6 6.2.2 asks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.keydir import PRIVATE_MODE, KeyFileError, ensure_directory, write_atomic


def create_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    common_name: str = "edge-agent",
    hostnames: list[str] | None = None,
    days: int = 3650,
    key_size: int = 2048,
    overwrite: bool = False,
) -> x509.Certificate:
    """Write `cert_path` (DER) and `key_path` (PEM, mode 0600), creating their folders 0700;
    returns the certificate."""
    for path in (cert_path, key_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists")
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for host in hostnames or [socket.gethostname()]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    for folder in (cert_path.parent, key_path.parent):
        ensure_directory(folder)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Atomic and 0600 from the first byte, also when it replaces a looser file (keydir rules).
    try:
        write_atomic(key_path, pem.decode("ascii"), mode=PRIVATE_MODE, overwrite=overwrite)
    except KeyFileError as exc:  # created meanwhile by someone else: kept, as above
        raise FileExistsError(str(exc)) from None
    return cert
