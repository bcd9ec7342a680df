"""``x509.pq.*``: an ML-DSA identity beside the classic one, used for peers that ask for it."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL._util import lib

from tests.pki import write_pki
from tests.unit.handshake.pairing import drive
from tlshd.config import Config, X509Side, parse_config
from tlshd.credentials import builders as creds
from tlshd.credentials.contexts import Contexts
from tlshd.errors import CredentialError
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete, HandshakeFailed
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType

# ML-DSA keys come from cryptography >= 46 (with an OpenSSL that has ML-DSA); the agent's
# x509.pq.* loads its files through OpenSSL and needs neither, but these tests make the keys.
mldsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.mldsa",
                            reason="this cryptography cannot generate ML-DSA keys")


def write_mldsa(directory: Path) -> tuple[Path, Path]:
    key = mldsa.MLDSA65PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlshd pq test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, None))
    cert_path, key_path = directory / "pq.crt", directory / "pq.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _reply(message_type: MsgType) -> AcceptReply:
    return AcceptReply(Header(0, 0, 1, 0), 3, message_type, AuthMode.X509, "localhost", None,
                       None, (), None, ())


def _handshake(server_ctx, client_ctx):
    client = HandshakeEngine(client_ctx, Role.CLIENT, peername="localhost")
    server = HandshakeEngine(server_ctx, Role.SERVER)
    return drive(client, server)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pq")
    pki = write_pki(directory)
    pq_cert, pq_key = write_mldsa(directory)
    bundle = directory / "trust.pem"
    bundle.write_bytes(pki.ca.read_bytes() + pq_cert.read_bytes())
    return pki, pq_cert, pq_key, bundle


def _server(setup, with_pq: bool):
    pki, pq_cert, pq_key, _ = setup
    side = X509Side(certificate=pki.server.cert, private_key=pki.server.key,
                    pq_certificate=pq_cert if with_pq else None,
                    pq_private_key=pq_key if with_pq else None)
    return Contexts.from_config(Config(server=side))(_reply(MsgType.SERVERHELLO))


def _mldsa_only_client(bundle: Path):
    ctx = creds.client_context(bundle)
    assert lib.SSL_CTX_set1_sigalgs_list(ctx._context, b"mldsa65") == 1
    return ctx


def test_a_peer_that_only_accepts_ml_dsa_gets_the_pq_certificate(setup):
    *_, bundle = setup
    client, server = _handshake(_server(setup, True), _mldsa_only_client(bundle))
    assert isinstance(client, HandshakeComplete) and isinstance(server, HandshakeComplete)
    leaf = x509.load_der_x509_certificate(client.session.peer_certificate_der)
    assert isinstance(leaf.public_key(), mldsa.MLDSA65PublicKey)


def test_without_pq_credentials_such_a_peer_fails(setup):
    *_, bundle = setup
    client, server = _handshake(_server(setup, False), _mldsa_only_client(bundle))
    assert isinstance(server, HandshakeFailed) or isinstance(client, HandshakeFailed)


def test_a_classic_peer_still_gets_a_session(setup):
    *_, bundle = setup
    client, server = _handshake(_server(setup, True), creds.client_context(bundle))
    assert isinstance(client, HandshakeComplete) and isinstance(server, HandshakeComplete)


def test_pq_certificate_without_its_key_is_ignored_with_a_warning():
    cfg = parse_config("[authenticate.server]\nx509.pq.certificate=/etc/pq.crt\n")
    assert cfg.server.pq_certificate is None and "go together" in cfg.warnings[0]


def test_unreadable_pq_key_refuses_server_requests(setup, tmp_path):
    pki, pq_cert, _pq_key, _ = setup
    side = X509Side(certificate=pki.server.cert, private_key=pki.server.key,
                    pq_certificate=pq_cert, pq_private_key=tmp_path / "missing.key")
    built = Contexts.from_config(Config(server=side))
    assert any("missing.key" in problem for problem in built.problems())
    with pytest.raises(CredentialError, match="missing"):
        built(_reply(MsgType.SERVERHELLO))
