"""The trust store and CRL rules, read one way by the agent and by ``tlshd doctor``.

* **Where the system store is**: OpenSSL's ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when the
  administrator set them; else the distribution's bundle (``SYSTEM_CA_BUNDLES``, Debian first:
  the ``cryptography`` wheels' OpenSSL looks in a directory no distribution fills).
* **A configured store** is a PEM bundle, or a hashed directory whose ``<subject hash>.<n>``
  entries are what OpenSSL looks up (nothing else in it counts).
* **A CRL file** holds PEM CRLs (several allowed) or one DER CRL.

The agent hands the store's location to OpenSSL (``load_verify_locations``) and the CRLs to
the context's store; ``doctor`` parses the same files to say what is in them.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from tlshd.credentials import files
from tlshd.errors import CredentialError

SYSTEM_CA_BUNDLES: tuple[str, ...] = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
)
HASHED_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")  # OpenSSL's <subject hash>.<n>
_CRL_MARKER = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True)
class SystemStore:
    """Where the system store is: ``bundle`` (a file) or ``directory``, and why there."""

    bundle: Path | None
    directory: Path | None
    source: str  # "$SSL_CERT_FILE", "$SSL_CERT_DIR" or "the distribution's bundle"


def system_store(environ: dict[str, str] | os._Environ[str] = os.environ) -> SystemStore:
    file, directory = environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR")
    if file or directory:
        first_dir = Path(directory.split(":")[0]) if directory else None
        return SystemStore(Path(file) if file else None, first_dir,
                           "$SSL_CERT_FILE" if file else "$SSL_CERT_DIR")
    for bundle in map(Path, SYSTEM_CA_BUNDLES):
        if bundle.is_file():
            return SystemStore(bundle, None, "the distribution's bundle")
    raise CredentialError(f"no system CA bundle ({', '.join(SYSTEM_CA_BUNDLES)})")


def read_file(path: Path, what: str) -> bytes:
    try:
        return files.read(path)
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    data = read_file(path, "CRL")
    try:
        if _CRL_MARKER in data:
            return [x509.load_pem_x509_crl(_CRL_MARKER + block)
                    for block in data.split(_CRL_MARKER)[1:]]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise CredentialError(f"CRL {path}: not a PEM or DER X.509 CRL") from None


def anchors(path: Path) -> list[x509.Certificate]:
    """The certificates of a configured store (a bundle or a hashed directory)."""
    return _hashed_dir(path) if path.is_dir() else pem_bundle(path)


def pem_bundle(path: Path) -> list[x509.Certificate]:
    try:
        return _load_pems(read_file(path, "trust store"))
    except ValueError:
        raise CredentialError(f"trust store {path} holds no PEM certificates") from None


def _load_pems(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():  # system stores hold a few pre-RFC 5280 roots
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_pem_x509_certificates(data)


def _hashed_dir(path: Path) -> list[x509.Certificate]:
    try:
        entries = sorted(p for p in path.iterdir() if HASHED_NAME.fullmatch(p.name))
    except OSError as exc:
        raise CredentialError(f"cannot read trust store directory {path}: "
                              f"{exc.strerror or exc}") from None
    certs: list[x509.Certificate] = []
    for entry in entries:
        try:
            certs += _load_pems(entry.read_bytes())
        except (OSError, ValueError):
            continue
    if not certs:
        raise CredentialError(f"trust store directory {path} has no <subject hash>.0 entries")
    return certs
