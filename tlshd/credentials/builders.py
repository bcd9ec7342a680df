"""Build the reusable ``SSL.Context`` objects that handshake engines run on.

A context is built once (at start-up or configuration reload) and shared by
many handshakes, so everything that can be checked up front is checked here
and reported as :class:`~tlshd.errors.CredentialError` naming the file (never
its contents): unreadable files, wrong formats, a key that does not match its
certificate, an empty trust store.

Every context:

* speaks TLS 1.3 only (min = max = TLS 1.3);
* verifies the peer (``VERIFY_PEER``; a server may additionally require a
  client certificate with ``VERIFY_FAIL_IF_NO_PEER_CERT``);
* has the session cache off and ``OP_NO_TICKET`` set: tlshd never resumes a
  session, so no PSK resumption or early data can be negotiated, and the
  OpenSSL server's NewSessionTickets (which the engine withholds from the wire)
  are useless stateful ids that are not even cached;
* has the key-log callback installed that forwards secrets to the engine
  owning each connection (:func:`tlshd.handshake.engine.route_keylog_line`).

Credentials may come from PEM/DER files (:meth:`X509Credentials.from_files`)
or from bytes, e.g. a kernel keyring payload (:meth:`X509Credentials.from_der`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from tlshd.credentials import files, trust
from tlshd.credentials.trust import SYSTEM_CA_BUNDLES, read_file
from tlshd.errors import ConfigError, CredentialError
from tlshd.handshake import _openssl
from tlshd.handshake.engine import route_keylog_line

__all__ = [
    "SYSTEM_CA_BUNDLES",
    "PrivateKey",
    "X509Credentials",
    "client_context",
    "client_context_from_credentials",
    "server_context",
    "server_context_from_credentials",
]

log = logging.getLogger("tlshd")

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_TLS_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

# cryptography's bundled OpenSSL looks for its default store under
# /opt/pyca/cryptography/openssl, which no distribution populates; pyOpenSSL
# only falls back when it recognises those exact paths. Load the
# distribution's bundle explicitly (Debian first), unless the administrator
# pointed OpenSSL elsewhere with SSL_CERT_FILE / SSL_CERT_DIR.

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, repr=False)
class X509Credentials:
    """A certificate chain (leaf first) and the leaf's private key.

    ``source`` describes where they came from for error messages and logs.
    """

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False)
    source: str = "in-memory credentials"

    def __post_init__(self) -> None:
        if not self.chain:
            raise CredentialError(f"{self.source}: no certificate")
        leaf_key = self.chain[0].public_key().public_bytes(*_SPKI)
        if self.private_key.public_key().public_bytes(*_SPKI) != leaf_key:
            raise CredentialError(f"{self.source}: private key does not match the certificate")

    def __repr__(self) -> str:
        return (
            f"X509Credentials(subject={self.chain[0].subject.rfc4514_string()!r}, "
            f"chain_len={len(self.chain)}, source={self.source!r}, private_key=<hidden>)"
        )

    @classmethod
    def from_files(cls, certificate: Path, private_key: Path) -> X509Credentials:
        """Load a PEM (or DER) certificate chain file and private key file."""
        chain = _parse_certificates(read_file(certificate, "certificate"),
                                    f"certificate {certificate}")
        key = _parse_private_key(read_file(private_key, "private key"),
                                 f"private key {private_key}")
        return cls(chain, key, source=f"{certificate} / {private_key}")

    @classmethod
    def from_der(
        cls,
        certificate_der: bytes | Sequence[bytes],
        private_key_der: bytes,
        *,
        source: str = "in-memory credentials",
    ) -> X509Credentials:
        """From DER bytes (e.g. kernel keyring payloads); a chain is leaf first."""
        ders = [certificate_der] if isinstance(certificate_der, bytes) else list(certificate_der)
        try:
            chain = tuple(x509.load_der_x509_certificate(der) for der in ders)
        except ValueError:
            raise CredentialError(f"{source}: certificate is not valid DER X.509") from None
        return cls(chain, _parse_private_key(private_key_der, f"{source} private key"), source)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


# -- context builders ----------------------------------------------------------


def client_context(
    truststore: Path | None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    *,
    ciphersuites: str | None = None,
    groups: str | None = None,
) -> SSL.Context:
    """Client context; with ``certificate``/``private_key`` it can do mutual TLS.

    ``truststore`` is a PEM bundle file or a hashed directory; None means the
    system store.
    """
    if (certificate is None) != (private_key is None):
        raise CredentialError("a client certificate needs its private key and vice versa")
    credentials = None
    if certificate is not None and private_key is not None:
        credentials = X509Credentials.from_files(certificate, private_key)
    return client_context_from_credentials(truststore, credentials, ciphersuites=ciphersuites,
                                           groups=groups)


def server_context(
    certificate: Path,
    private_key: Path,
    truststore: Path | None,
    require_client_cert: bool,
    *,
    request_client_cert: bool = True,
    ciphersuites: str | None = None,
    groups: str | None = None,
) -> SSL.Context:
    """Server context: requests (and optionally requires) a client certificate."""
    return server_context_from_credentials(
        X509Credentials.from_files(certificate, private_key),
        truststore,
        require_client_cert,
        request_client_cert=request_client_cert,
        ciphersuites=ciphersuites,
        groups=groups,
    )


def client_context_from_credentials(
    truststore: Path | None,
    credentials: X509Credentials | None,
    *,
    ciphersuites: str | None = None,
    groups: str | None = None,
) -> SSL.Context:
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, SSL.VERIFY_PEER, ciphersuites, groups)
    _load_trust(ctx, truststore)
    if credentials is not None:
        _use_credentials(ctx, credentials)
    return ctx


def server_context_from_credentials(
    credentials: X509Credentials,
    truststore: Path | None,
    require_client_cert: bool,
    *,
    request_client_cert: bool = True,
    ciphersuites: str | None = None,
    groups: str | None = None,
) -> SSL.Context:
    """``require_client_cert`` implies requesting one."""
    request = request_client_cert or require_client_cert
    mode = SSL.VERIFY_PEER if request else SSL.VERIFY_NONE
    if require_client_cert:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx = _base_context(SSL.TLS_SERVER_METHOD, mode, ciphersuites, groups)
    if request:
        _load_trust(ctx, truststore)
    _use_credentials(ctx, credentials)
    return ctx


# One key share, for the post-quantum hybrid; the server's first tuple is the hybrid alone,
# so a client that supports it but sent a share for a classical group only is asked for the
# hybrid (a HelloRetryRequest), and a classical client gets X25519 or P-256 without one.
# OpenSSL 3.5's own default is the same order with a second key share (X25519) in every
# ClientHello: about 40 us more per handshake side here, and more under emulation.
DEFAULT_GROUPS = "?*X25519MLKEM768 / ?X25519:?secp256r1 / ?X448:?secp384r1:?secp521r1"


def _base_context(method: int, verify_mode: int, ciphersuites: str | None,
                  groups: str | None = None) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if ciphersuites is not None:
        if not ciphersuites.strip():
            raise ConfigError("the TLS 1.3 cipher suite list is empty")
        try:
            _openssl.set_tls13_ciphersuites(ctx, ciphersuites.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise ConfigError(f"no usable TLS 1.3 cipher suite in {ciphersuites!r}") from None
    _set_groups(ctx, groups)
    ctx.set_verify(verify_mode)
    ctx.set_keylog_callback(route_keylog_line)
    return ctx


_told_no_groups = False


def _crypto_version() -> str:
    import cryptography

    return str(cryptography.__version__)


def _set_groups(ctx: SSL.Context, groups: str | None) -> None:
    """Lenient, as a service at boot must be: a list this OpenSSL cannot use at all is
    logged and the default taken. A binding that cannot set groups at all (cryptography 43,
    Debian trixie's) leaves OpenSSL's own defaults, and says so once if groups were set."""
    if not _openssl.HAS_GROUPS:
        global _told_no_groups  # noqa: PLW0603 - one line per process, not per context
        if groups and not _told_no_groups:
            log.warning("[authenticate] groups: this OpenSSL binding (cryptography %s) cannot "
                        "set key exchange groups; OpenSSL's defaults are used", _crypto_version())
            _told_no_groups = True
        return
    if groups:
        try:
            _openssl.set_groups(ctx, groups)
            return
        except (SSL.Error, UnicodeEncodeError):
            log.warning("[authenticate] groups: no key exchange group of %r is usable here; "
                        "using the default", groups)
    _openssl.set_groups(ctx, DEFAULT_GROUPS)


def _use_credentials(ctx: SSL.Context, credentials: X509Credentials) -> None:
    try:
        ctx.use_certificate(credentials.chain[0])  # type: ignore[arg-type, unused-ignore]
        for cert in credentials.chain[1:]:
            ctx.add_extra_chain_cert(cert)  # type: ignore[arg-type, unused-ignore]
        ctx.use_privatekey(credentials.private_key)  # type: ignore[arg-type, unused-ignore]
        ctx.check_privatekey()
    except SSL.Error:
        message = f"{credentials.source}: OpenSSL cannot use these credentials"
        raise CredentialError(message) from None


# -- trust stores ----------------------------------------------------------------


def _load_trust(ctx: SSL.Context, truststore: Path | None) -> None:
    if truststore is None:
        _load_system_trust(ctx)
    elif _is_dir(truststore):
        if not os.access(truststore, os.R_OK | os.X_OK):
            raise CredentialError(f"cannot read trust store directory {truststore}")
        ctx.load_verify_locations(None, str(truststore))
    else:
        read_file(truststore, "trust store")  # a clear error if missing or unreadable
        try:
            with files.openssl_path(truststore) as path:
                ctx.load_verify_locations(path)
        except (SSL.Error, OSError):
            raise CredentialError(f"trust store {truststore} holds no PEM certificates") from None


def _is_dir(path: Path) -> bool:
    """False also when this process may not look (a confined handshake process, a 0700
    parent directory): a bundle is then read through the monitor (tlshd.credentials.files)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _load_system_trust(ctx: SSL.Context) -> None:
    try:
        store = trust.system_store()
    except CredentialError:
        ctx.set_default_verify_paths()  # OpenSSL's own idea, the last resort
        return
    if store.source == "the distribution's bundle":
        ctx.load_verify_locations(str(store.bundle))
    else:
        ctx.set_default_verify_paths()  # OpenSSL honours $SSL_CERT_FILE / $SSL_CERT_DIR


# -- parsing -------------------------------------------------------------------------


def _parse_certificates(data: bytes, where: str) -> tuple[x509.Certificate, ...]:
    try:
        if b"-----BEGIN" in data:
            return tuple(x509.load_pem_x509_certificates(data))
        return (x509.load_der_x509_certificate(data),)
    except ValueError:
        raise CredentialError(f"{where} is not a PEM or DER X.509 certificate") from None


def _parse_private_key(data: bytes, where: str) -> PrivateKey:
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise CredentialError(f"{where} is encrypted; tlshd needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"{where} is not a PEM or DER private key") from None
    if not isinstance(key, _TLS_KEY_TYPES):
        raise CredentialError(f"{where}: {type(key).__name__} keys cannot sign TLS 1.3 handshakes")
    return key


def load_crl(ctx: SSL.Context, path: Path) -> None:
    """Enforce the CRLs in ``path`` (PEM, several allowed, or one DER) on the peer's leaf.

    OpenSSL then fails verification of a revoked certificate with "certificate revoked", and
    of a certificate whose issuer has no CRL in the file with "unable to get certificate CRL":
    a configured CRL file must cover the CAs it is used with.
    """
    crls = trust.read_crls(path)
    store = ctx.get_cert_store()
    if store is None:
        raise CredentialError(f"CRL {path}: context has no certificate store")
    for crl in crls:
        store.add_crl(crl)
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


def psk_context(method: int, ciphersuites: str, groups: str | None = None) -> SSL.Context:
    """A PSK-only context (no certificates either way) for suites of one hash (psk_dhe_ke:
    the groups matter here too)."""
    from tlshd.handshake import _psk

    ctx = _base_context(method, SSL.VERIFY_NONE, ciphersuites, groups)
    if method == SSL.TLS_CLIENT_METHOD:
        _psk.enable_client_psk(ctx)
    else:
        _psk.enable_server_psk(ctx)
    return ctx


def add_pq_credentials(ctx: SSL.Context, certificate: Path, private_key: Path) -> None:
    """A second identity (``x509.pq.*``, e.g. ML-DSA) beside the classic one.

    OpenSSL keeps one certificate per key type and picks, per handshake, the one the peer's
    signature algorithms allow. pyOpenSSL cannot wrap ML-DSA keys, so the files are loaded
    by OpenSSL itself. An OpenSSL without the algorithm fails here, at start.
    """
    read_file(certificate, "post-quantum certificate")
    read_file(private_key, "post-quantum private key")
    try:
        with files.openssl_path(certificate) as cert, files.openssl_path(private_key) as key:
            ctx.use_certificate_chain_file(cert)
            ctx.use_privatekey_file(key)
        ctx.check_privatekey()
    except (SSL.Error, OSError) as exc:
        raise CredentialError(f"post-quantum credentials {certificate} / {private_key}: "
                              f"{_ssl_reason(exc)}") from None


def _ssl_reason(exc: SSL.Error | OSError) -> str:
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return "; ".join(str(item[-1]) for item in args) or "rejected by OpenSSL"
