"""A private CA and the SuperLink's TLS certificate, as Flower's TLS flags expect them.

The SuperLink serves its Fleet, Control and Runtime APIs over TLS with `--ssl-ca-certfile ca.crt
--ssl-certfile server.pem --ssl-keyfile server.key`; SuperNodes and the `flwr` CLI verify it
against `ca.crt`. Clients check the server's name against the certificate's subjectAltNames, so
every host name or IP address the SuperLink is reached by must be listed there (IP addresses as
IP entries: a DNS entry "10.0.0.5" does not match an IP connection).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: File names Flower's documentation and our README use.
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
#: ECDSA curve of both keys (P-384: the curve Flower uses for node auth as well).
CURVE = ec.SECP384R1
#: Validity: long enough for a study, short enough that a leaked key expires.
DEFAULT_VALIDITY_DAYS = 365
#: Backdating absorbs clock skew between the hosts.
CLOCK_SKEW = timedelta(minutes=5)
#: Private keys are readable by their owner only.
PRIVATE_KEY_MODE = 0o600


@dataclass(frozen=True)
class CertificatePaths:
    """Where `make_certificates` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """IP entries for addresses, DNS entries for names; duplicates dropped, order kept."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        host = raw.strip()
        if not host:
            continue
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise ValueError(
                    f"--host {raw!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("at least one --host (name or IP the SuperLink is reached by) is needed")
    return names


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, PRIVATE_KEY_MODE)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(out_dir: Path, hosts: list[str], *,
                      validity_days: int = DEFAULT_VALIDITY_DAYS,
                      organisation: str = "fedstack",
                      overwrite: bool = False) -> CertificatePaths:
    """Write a fresh CA (ca.crt, ca.key) and a SuperLink certificate for `hosts`.

    The CA key signs only this one server certificate; keep it off the SuperLink host (or
    delete it) once the certificate is made.
    """
    if validity_days < 1:
        raise ValueError(f"validity_days={validity_days} must be >= 1")
    sans = subject_alt_names(hosts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths(out_dir / CA_CERT_FILE, out_dir / CA_KEY_FILE,
                             out_dir / SERVER_CERT_FILE, out_dir / SERVER_KEY_FILE)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
                if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (pass --force to replace the TLS material)")

    now = datetime.now(UTC) - CLOCK_SKEW
    until = now + timedelta(days=validity_days)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name(f"{organisation} federation CA", organisation)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE())
    first = sans[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first), organisation)).issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(paths.ca_key, ca_key)
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(paths.server_key, server_key)
    return paths
