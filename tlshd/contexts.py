"""SSL contexts per request kind, built once from the configuration and reused.

Building a context reads files and parses keys; doing it per handshake would
put file I/O on the hot path. ``Contexts`` builds the configured ones up front
(so a bad certificate fails at start, not at the first mount) and picks one
per ACCEPT. Only a request that names its own certificate and key serials
(keyring-provisioned credentials) gets a context built for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL

from tlshd import keyring
from tlshd.config import Config
from tlshd.errors import CredentialError
from tlshd.handshake import credentials as creds
from tlshd.handshake.secrets import HashAlg
from tlshd.ktls import CipherSuite
from tlshd.netlink.messages import AcceptReply
from tlshd.netlink.spec import AuthMode, MsgType

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


def _psk_contexts(method: int) -> dict[HashAlg, SSL.Context]:
    return {alg: creds.psk_context(method, suites) for alg, suites in PSK_SUITES.items()}


@dataclass(frozen=True)
class Contexts:
    config: Config
    client_anon: SSL.Context
    client_x509: SSL.Context | None
    server: SSL.Context | None
    psk_client: dict[HashAlg, SSL.Context]
    psk_server: dict[HashAlg, SSL.Context]

    @classmethod
    def from_config(cls, config: Config) -> Contexts:
        client, server = config.client, config.server
        client_x509 = None
        if client.certificate is not None and client.private_key is not None:
            client_x509 = creds.client_context(client.truststore, client.certificate,
                                               client.private_key, ciphersuites=KTLS_SUITES)
        server_ctx = None
        if server.certificate is not None and server.private_key is not None:
            server_ctx = creds.server_context(server.certificate, server.private_key,
                                              server.truststore, config.require_client_cert,
                                              ciphersuites=KTLS_SUITES)
        anon = creds.client_context(client.truststore, ciphersuites=KTLS_SUITES)
        for ctx, side in ((anon, client), (client_x509, client), (server_ctx, server)):
            if ctx is not None and side.crl is not None:
                creds.load_crl(ctx, side.crl)
        for ctx, side in ((client_x509, client), (server_ctx, server)):
            if ctx is not None and side.pq_certificate and side.pq_private_key:
                creds.add_pq_credentials(ctx, side.pq_certificate, side.pq_private_key)
        return cls(config, anon, client_x509, server_ctx,
                   _psk_contexts(SSL.TLS_CLIENT_METHOD), _psk_contexts(SSL.TLS_SERVER_METHOD))

    def __call__(self, reply: AcceptReply) -> SSL.Context:
        cert = reply.certificate
        if cert is not None and (cert.cert or cert.privkey):
            return self._from_keyring(reply)
        if reply.message_type == MsgType.SERVERHELLO:
            if self.server is None:
                raise CredentialError("no server certificate configured "
                                      "([authenticate.server] x509.certificate)")
            return self.server
        if reply.auth_mode == AuthMode.X509 and self.client_x509 is not None:
            return self.client_x509
        return self.client_anon

    def _from_keyring(self, reply: AcceptReply) -> SSL.Context:
        assert reply.certificate is not None
        material = creds.X509Credentials.from_der(
            keyring.read_key(reply.certificate.cert), keyring.read_key(reply.certificate.privkey)
        )
        if reply.message_type == MsgType.SERVERHELLO:
            ctx = creds.server_context_from_credentials(
                material, self.config.server.truststore, self.config.require_client_cert,
                ciphersuites=KTLS_SUITES)
            side = self.config.server
        else:
            ctx = creds.client_context_from_credentials(self.config.client.truststore, material,
                                                        ciphersuites=KTLS_SUITES)
            side = self.config.client
        if side.crl is not None:
            creds.load_crl(ctx, side.crl)
        return ctx
