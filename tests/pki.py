"""Throwaway PKI for tests: CAs, server and client certificates, keys, PEM files.

``write_pki(directory)`` builds one complete set and writes it as PEM files:

* ``ca``: the trusted root (bundle file, and ``ca_dir``: a hashed directory);
* ``server``: EC P-256 leaf with DNS SANs ``server.test``/``localhost`` and IP
  SANs ``127.0.0.1``/``::1``; ``server_rsa`` and ``server_ed25519`` are the
  same names on RSA-2048 and Ed25519 keys;
* ``client``: a client leaf (EC P-256);
* ``expired_server``: like ``server`` but expired yesterday;
* ``untrusted_ca`` and ``untrusted_server``/``untrusted_client``: a second
  root nobody trusts and leaves it issued.

Everything is generated fresh (nothing secret is checked in); RSA generation
is the slow part, so tests build one set per session.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

SERVER_DNS = ("server.test", "localhost")
SERVER_IPS = ("127.0.0.1", "::1")
CLIENT_DNS = ("client.test",)

_DAY = datetime.timedelta(days=1)


def make_key(kind: str = "ec") -> PrivateKey:
    """A fresh private key: ``ec`` (P-256), ``rsa`` (2048 bits) or ``ed25519``."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlshd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class Issued:
    """One certificate with its private key (kept out of ``repr``)."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_der(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_ca(common_name: str = "tlshd test CA", kind: str = "ec") -> Issued:
    key = make_key(kind)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # older than every leaf it issues, the expired one included, as a real CA is
        .not_valid_before(now - 60 * _DAY)
        .not_valid_after(now + 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(builder.sign(key, _hash_for(key)), key)


def issue_leaf(
    ca: Issued,
    common_name: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    client: bool = False,
    kind: str = "ec",
    expired: bool = False,
) -> Issued:
    """A leaf certificate signed by ``ca`` for server (default) or client auth."""
    key = make_key(kind)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now - _DAY if expired else now + 30 * _DAY
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - 30 * _DAY)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, _hash_for(ca.key)), key)


@dataclass(frozen=True)
class PEMFiles:
    """Where one certificate and its key were written, plus their DER forms."""

    cert: Path
    key: Path
    issued: Issued

    @property
    def cert_der(self) -> bytes:
        return self.issued.cert_der

    @property
    def key_der(self) -> bytes:
        return self.issued.key_der


@dataclass(frozen=True)
class PKI:
    ca: Path
    ca_dir: Path
    ca_issued: Issued
    untrusted_ca: Path
    server: PEMFiles
    server_rsa: PEMFiles
    server_ed25519: PEMFiles
    client: PEMFiles
    expired_server: PEMFiles
    untrusted_server: PEMFiles
    untrusted_client: PEMFiles


def write_issued(directory: Path, stem: str, issued: Issued) -> PEMFiles:
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return PEMFiles(cert, key, issued)


def write_hashed_dir(directory: Path, *cas: Issued) -> Path:
    """A ``c_rehash``-style directory (``<subject hash>.0``) for a trust store path."""
    directory.mkdir(parents=True, exist_ok=True)
    for ca in cas:
        digest = crypto.X509.from_cryptography(ca.cert).subject_name_hash()
        (directory / f"{digest:08x}.0").write_bytes(ca.cert_pem())
    return directory


def write_pki(directory: Path) -> PKI:
    """Generate a complete throwaway PKI and write it under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = make_ca(), make_ca("untrusted test CA")
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    (directory / "untrusted-ca.pem").write_bytes(other.cert_pem())

    def server(stem: str, issuer: Issued, kind: str = "ec", expired: bool = False) -> PEMFiles:
        leaf = issue_leaf(
            issuer, "server.test", dns=SERVER_DNS, ips=SERVER_IPS, kind=kind, expired=expired
        )
        return write_issued(directory, stem, leaf)

    def client(stem: str, issuer: Issued) -> PEMFiles:
        leaf = issue_leaf(issuer, "client.test", dns=CLIENT_DNS, client=True)
        return write_issued(directory, stem, leaf)

    return PKI(
        ca=directory / "ca.pem",
        ca_dir=write_hashed_dir(directory / "ca.d", ca),
        ca_issued=ca,
        untrusted_ca=directory / "untrusted-ca.pem",
        server=server("server", ca),
        server_rsa=server("server-rsa", ca, kind="rsa"),
        server_ed25519=server("server-ed25519", ca, kind="ed25519"),
        client=client("client", ca),
        expired_server=server("server-expired", ca, expired=True),
        untrusted_server=server("server-untrusted", other),
        untrusted_client=client("client-untrusted", other),
    )
