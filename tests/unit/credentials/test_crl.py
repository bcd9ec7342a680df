"""A configured CRL is enforced: a revoked peer certificate fails the handshake."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.pki import PKI, Issued, write_pki
from tests.unit.handshake.pairing import drive
from tlshd.config import Config, X509Side
from tlshd.credentials import builders as creds
from tlshd.credentials.contexts import Contexts
from tlshd.errors import CredentialError, PeerAuthenticationError
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete, HandshakeFailed
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


def write_crl(path: Path, ca: Issued, revoked: list[x509.Certificate], *, pem: bool = True) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - datetime.timedelta(minutes=1))
               .next_update(now + datetime.timedelta(days=1)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
    crl = builder.sign(ca.key, hashes.SHA256())
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    path.write_bytes(crl.public_bytes(encoding))
    return path


def handshake(client: HandshakeEngine, server: HandshakeEngine) -> tuple[object, object]:
    return drive(client, server)


def contexts(pki: PKI, server_crl: Path | None) -> Contexts:
    config = Config(
        client=X509Side(truststore=pki.ca, certificate=pki.client.cert,
                        private_key=pki.client.key),
        server=X509Side(truststore=pki.ca, certificate=pki.server.cert,
                        private_key=pki.server.key, crl=server_crl),
        require_client_cert=True,
    )
    return Contexts.from_config(config)


def reply(message_type: MsgType) -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 3, message_type, AuthMode.X509, "localhost", None,
                       None, (), None, ())


@pytest.mark.parametrize("pem", [True, False])
def test_revoked_client_certificate_is_rejected_by_the_server(pki, tmp_path, pem):
    crl = write_crl(tmp_path / "ca.crl", pki.ca_issued, [pki.client.issued.cert], pem=pem)
    ctxs = contexts(pki, crl)
    client = HandshakeEngine(ctxs(reply(MsgType.CLIENTHELLO)), Role.CLIENT, peername="localhost")
    server = HandshakeEngine(ctxs(reply(MsgType.SERVERHELLO)), Role.SERVER)
    _client_event, server_event = handshake(client, server)
    assert isinstance(server_event, HandshakeFailed)
    assert isinstance(server_event.error, PeerAuthenticationError)
    assert "revoked" in str(server_event.error)


def test_crl_that_does_not_list_the_peer_lets_it_in(pki, tmp_path):
    crl = write_crl(tmp_path / "ca.crl", pki.ca_issued, [pki.expired_server.issued.cert])
    ctxs = contexts(pki, crl)
    client = HandshakeEngine(ctxs(reply(MsgType.CLIENTHELLO)), Role.CLIENT, peername="localhost")
    server = HandshakeEngine(ctxs(reply(MsgType.SERVERHELLO)), Role.SERVER)
    events = handshake(client, server)
    assert all(isinstance(e, HandshakeComplete) for e in events)


def test_unreadable_or_malformed_crl_is_a_problem_and_refuses_the_side_that_needs_it(pki, tmp_path):
    bad = tmp_path / "bad.crl"
    bad.write_bytes(b"not a crl")
    built = contexts(pki, bad)  # the start goes on, as with ktls-utils
    assert any("bad.crl" in problem for problem in built.problems())
    with pytest.raises(CredentialError, match=r"bad\.crl"):
        built(reply(MsgType.SERVERHELLO))
    assert built(reply(MsgType.CLIENTHELLO)) is not None  # the client side is unaffected
    with pytest.raises(CredentialError, match=r"missing\.crl"):
        creds.load_crl(creds.client_context(pki.ca), tmp_path / "missing.crl")
