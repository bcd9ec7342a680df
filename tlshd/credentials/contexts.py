"""SSL contexts per request kind, built from the configuration and kept fresh from disk.

Building a context reads files and parses keys; doing it per handshake would put file I/O
and parsing on the hot path. Each configured context is a ``CredentialSlot``: built once, and
rebuilt only when one of its files (certificate, key, trust store, CRL) changes on disk, which
a ``stat`` per file per handshake finds (device, inode, size, mtime and ctime: an edit in
place and a rename over the file both show). ktls-utils re-reads every file for each
handshake; this agent follows a renewed certificate or a refreshed CRL in the same way,
without the re-parse. A changed file that cannot be used (unreadable, half written, a key
that does not match) keeps the credentials that were loaded, and the reason is logged once
per change; ``tlshd doctor`` reports it.

Nothing here stops the agent: a file that is missing or bad at start is logged, and only the
requests that need it fail (a server one with a fatal alert), as with the reference, which
reads the files per handshake. Only a request that names its own certificate and key serials
(keyring-provisioned credentials) gets a context built for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from OpenSSL import SSL

from tlshd.config import Config, X509Side
from tlshd.credentials import builders as creds
from tlshd.credentials import files
from tlshd.credentials.files import FileState
from tlshd.credentials.keys import LOCAL_KEYS, RequestKeys
from tlshd.errors import CredentialError, TlshdError
from tlshd.handshake.secrets import HashAlg
from tlshd.ktls import CipherSuite
from tlshd.netlink.messages import AcceptReply
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.tags import TAGS_DIR, TagSet, load_tags

log = logging.getLogger("tlshd")

# Exactly the TLS 1.3 suites kTLS can carry (never CCM_8), strongest first. OpenSSL's default
# list lacks TLS_AES_128_CCM_SHA256; a peer restricted to it must still get a session.
KTLS_SUITES = ":".join(s.openssl_name for s in (
    CipherSuite.TLS_AES_256_GCM_SHA384, CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
    CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_AES_128_CCM_SHA256))


# A PSK's hash fixes the suites: NVMe/TCP pairs SHA-256 PSKs with the SHA-256 suites and
# SHA-384 PSKs with TLS_AES_256_GCM_SHA384.
PSK_SUITES = {
    HashAlg.SHA256: ":".join(s.openssl_name for s in (
        CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
        CipherSuite.TLS_AES_128_CCM_SHA256)),
    HashAlg.SHA384: CipherSuite.TLS_AES_256_GCM_SHA384.openssl_name,
}


def _psk_contexts(method: int, groups: str) -> dict[HashAlg, SSL.Context]:
    return {alg: creds.psk_context(method, suites, groups) for alg, suites in PSK_SUITES.items()}


class CredentialSlot:
    """One configured context and the files it was built from."""

    def __init__(self, what: str, paths: tuple[Path, ...],
                 build: Callable[[], SSL.Context]) -> None:
        self.what = what
        self.paths = paths
        self._build = build
        self._states: tuple[FileState, ...] | None = None
        self.context: SSL.Context | None = None
        self.problem: str | None = None  # why the files on disk are not what is in use
        self.builds = 0
        self.refresh()

    def __repr__(self) -> str:
        return f"CredentialSlot({self.what!r}, loaded={self.context is not None})"

    def refresh(self) -> None:
        """Rebuild when a file changed since the last look; keep the old context on failure."""
        states = files.states(self.paths)
        if states == self._states:
            return
        self._states = states
        self.builds += 1
        try:
            context = self._build()
        except (TlshdError, SSL.Error, ValueError) as exc:
            self.problem = str(exc) or type(exc).__name__
            if self.context is None:
                log.error("%s cannot be used: %s", self.what, self.problem)
            else:
                log.warning("%s changed on disk but cannot be used, keeping the loaded "
                            "credentials: %s", self.what, self.problem)
            return
        if self.context is not None:
            log.info("%s reloaded from disk", self.what)
        self.context, self.problem = context, None

    def get(self) -> SSL.Context:
        self.refresh()
        if self.context is None:
            raise CredentialError(f"{self.what}: {self.problem}")
        return self.context


def _paths(side: X509Side, *keys: str) -> tuple[Path, ...]:
    return tuple(p for p in (getattr(side, k) for k in keys) if p is not None)


def _client_slot(config: Config, anonymous: bool, side: X509Side | None = None,
                 group: str = "authenticate.client") -> CredentialSlot:
    side = side or config.client

    def build() -> SSL.Context:
        if anonymous:
            ctx = creds.client_context(side.truststore, ciphersuites=KTLS_SUITES,
                                       groups=config.groups)
        else:
            ctx = creds.client_context(side.truststore, side.certificate, side.private_key,
                                       ciphersuites=KTLS_SUITES, groups=config.groups)
            _add_pq(ctx, side)
            _notify_modes(side)
        if side.crl is not None:
            creds.load_crl(ctx, side.crl)
        return ctx

    if anonymous:
        return CredentialSlot(f"[{group}] trust store",
                              _paths(side, "truststore", "crl"), build)
    return CredentialSlot(f"[{group}] x509 credentials", _paths(
        side, "truststore", "crl", "certificate", "private_key", "pq_certificate",
        "pq_private_key"), build)


def _server_slot(config: Config, side: X509Side | None = None,
                 group: str = "authenticate.server", client_auth: str = "") -> CredentialSlot:
    """``client_auth`` ([app.credentials.NAME]): none, optional or required; "" for
    [authenticate.server], which asks for a client certificate and requires one with
    ``[agent] require_client_cert``."""
    side = side or config.server
    require = client_auth == "required" if client_auth else config.require_client_cert

    def build() -> SSL.Context:
        if side.certificate is None or side.private_key is None:
            missing = "x509.private_key" if side.private_key is None else "x509.certificate"
            raise CredentialError(f"{missing} is not set: no usable server credentials")
        ctx = creds.server_context(side.certificate, side.private_key, side.truststore,
                                   require, request_client_cert=client_auth != "none",
                                   ciphersuites=KTLS_SUITES, groups=config.groups)
        if side.crl is not None:
            creds.load_crl(ctx, side.crl)
        _add_pq(ctx, side)
        _notify_modes(side)
        return ctx

    return CredentialSlot(f"[{group}] x509 credentials", _paths(
        side, "truststore", "crl", "certificate", "private_key", "pq_certificate",
        "pq_private_key"), build)


def _app_slots(config: Config) -> dict[tuple[str, str], CredentialSlot]:
    """Per ``[app.credentials.NAME]``: a client slot (its certificate if it has one, else
    its trust store alone) and, with a certificate, a server slot with its client_auth."""
    slots: dict[tuple[str, str], CredentialSlot] = {}
    for name, profile in config.app_credentials.items():
        side, group = profile.side, f"app.credentials.{name}"
        has_cert = side.certificate is not None or side.private_key is not None
        slots[(name, "client")] = _client_slot(config, not has_cert, side, group)
        if has_cert:
            slots[(name, "server")] = _server_slot(config, side, group, profile.client_auth)
    return slots


CERT_MODE, KEY_MODE = 0o644, 0o600  # ktls-utils src/tlshd/config.c: TLSHD_CERT/PRIVKEY_MODE


def file_notices(side: X509Side) -> list[str]:
    """ktls-utils' notices for credential files (src/tlshd/config.c, tlshd_config_read_datum):
    owner root, certificates mode 0644, private keys 0600. Notices only: nothing is refused."""
    out = []
    for path, mode in ((side.certificate, CERT_MODE), (side.pq_certificate, CERT_MODE),
                       (side.private_key, KEY_MODE), (side.pq_private_key, KEY_MODE)):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != 0:
            out.append(f"File {path}: expected owner 0")
        if st.st_mode & 0o777 != mode:
            out.append(f"File {path}: expected mode {mode:o}")
    return out


def _notify_modes(side: X509Side) -> None:
    for notice in file_notices(side):
        log.info("%s", notice)


def _add_pq(ctx: SSL.Context, side: X509Side) -> None:
    if side.pq_certificate and side.pq_private_key:
        creds.add_pq_credentials(ctx, side.pq_certificate, side.pq_private_key)


@dataclass(frozen=True)
class Contexts:
    config: Config
    client_anon: CredentialSlot
    client_x509: CredentialSlot | None
    server: CredentialSlot | None
    psk_client: dict[HashAlg, SSL.Context]
    psk_server: dict[HashAlg, SSL.Context]
    keys: RequestKeys = LOCAL_KEYS  # where keyring-provisioned certificates are read
    tags: TagSet = field(default_factory=lambda: TagSet(TAGS_DIR))  # session tags in force
    # [app.credentials.NAME] by (NAME, role): only an application request whose policy rule
    # names NAME uses them (AcceptReply.profile, set by the agent, never by the caller)
    app: dict[tuple[str, str], CredentialSlot] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> Contexts:
        """Build every configured context; a bad file is logged and kept as a problem."""
        client, server = config.client, config.server
        client_x509 = None
        if client.certificate is not None or client.private_key is not None:
            client_x509 = _client_slot(config, anonymous=False)
        server_slot = None
        if server.certificate is not None or server.private_key is not None:
            server_slot = _server_slot(config)
        return cls(config, _client_slot(config, anonymous=True), client_x509, server_slot,
                   _psk_contexts(SSL.TLS_CLIENT_METHOD, config.groups),
                   _psk_contexts(SSL.TLS_SERVER_METHOD, config.groups),
                   tags=load_tags(config.tags_dir), app=_app_slots(config))

    @property
    def slots(self) -> tuple[CredentialSlot, ...]:
        return (*(s for s in (self.client_anon, self.client_x509, self.server) if s),
                *self.app.values())

    def problems(self) -> list[str]:
        """Why configured credentials on disk are not (or not all) in use."""
        return [f"{slot.what}: {slot.problem}" for slot in self.slots if slot.problem]

    def __call__(self, reply: AcceptReply) -> SSL.Context:
        if reply.profile:
            role = "server" if reply.message_type == MsgType.SERVERHELLO else "client"
            slot = self.app.get((reply.profile, role))
            if slot is None:
                raise CredentialError(f"[app.credentials.{reply.profile}] has no "
                                      f"{'certificate' if role == 'server' else 'entry'} "
                                      f"for a {role}")
            return slot.get()
        cert = reply.certificate
        if cert is not None and (cert.cert or cert.privkey):
            return self._from_keyring(reply)
        if reply.message_type == MsgType.SERVERHELLO:
            if self.server is None:
                raise CredentialError("no server certificate configured "
                                      "([authenticate.server] x509.certificate)")
            return self.server.get()
        if reply.auth_mode == AuthMode.X509 and self.client_x509 is not None:
            return self.client_x509.get()
        return self.client_anon.get()

    def _from_keyring(self, reply: AcceptReply) -> SSL.Context:
        assert reply.certificate is not None
        material = creds.X509Credentials.from_der(*self.keys.x509(reply))
        if reply.message_type == MsgType.SERVERHELLO:
            ctx = creds.server_context_from_credentials(
                material, self.config.server.truststore, self.config.require_client_cert,
                ciphersuites=KTLS_SUITES, groups=self.config.groups)
            side = self.config.server
        else:
            ctx = creds.client_context_from_credentials(self.config.client.truststore, material,
                                                        ciphersuites=KTLS_SUITES,
                                                        groups=self.config.groups)
            side = self.config.client
        if side.crl is not None:
            creds.load_crl(ctx, side.crl)
        return ctx
