"""Context builders and X509Credentials: what is checked up front, and how it fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from OpenSSL import SSL, crypto

from tests.pki import PKI, write_pki
from tlshd.credentials import builders as credentials
from tlshd.credentials.builders import X509Credentials
from tlshd.errors import ConfigError, CredentialError
from tlshd.handshake import _openssl
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete, NeedData, SessionResult


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


def handshake(
    client_ctx: SSL.Context, server_ctx: SSL.Context, peername: str = "server.test"
) -> tuple[SessionResult, SessionResult]:
    client = HandshakeEngine(client_ctx, Role.CLIENT, peername=peername)
    server = HandshakeEngine(server_ctx, Role.SERVER)
    for _ in range(50):
        for me, peer in ((client, server), (server, client)):
            data = me.data_to_send()
            if data and isinstance(peer.next_event(), NeedData):
                peer.receive_data(data)
    results = client.next_event(), server.next_event()
    assert isinstance(results[0], HandshakeComplete), results
    assert isinstance(results[1], HandshakeComplete), results
    return results[0].session, results[1].session


def assert_no_key_material(text: str, files_or_der: bytes) -> None:
    assert files_or_der.hex() not in text.lower()
    for line in files_or_der.decode("latin-1").splitlines():
        if len(line) > 16 and "-----" not in line:
            assert line not in text


# -- X509Credentials -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["server", "server_rsa", "server_ed25519", "client"])
def test_credentials_from_files(pki: PKI, name: str) -> None:
    files = getattr(pki, name)
    creds = X509Credentials.from_files(files.cert, files.key)
    assert creds.certificate.public_bytes(serialization.Encoding.DER) == files.cert_der
    assert str(files.cert) in creds.source


def test_credentials_from_der_and_chain(pki: PKI) -> None:
    creds = X509Credentials.from_der(
        [pki.server.cert_der, pki.ca_issued.cert_der], pki.server.key_der, source="key 42"
    )
    assert len(creds.chain) == 2 and creds.source == "key 42"
    single = X509Credentials.from_der(pki.client.cert_der, pki.client.key_der)
    assert len(single.chain) == 1


def test_credentials_from_der_files(pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.der", tmp_path / "k.der"
    cert.write_bytes(pki.server.cert_der)
    key.write_bytes(pki.server.key_der)
    assert X509Credentials.from_files(cert, key).chain[0] == pki.server.issued.cert


def test_credentials_repr_hides_the_key(pki: PKI) -> None:
    creds = X509Credentials.from_files(pki.server.cert, pki.server.key)
    for text in (repr(creds), str(creds)):
        assert "<hidden>" in text and "server.test" in text
        assert_no_key_material(text, pki.server.key_der)
        assert_no_key_material(text, pki.server.key.read_bytes())
        assert repr(pki.server.key_der) not in text


def test_missing_file_is_named(pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CredentialError, match=r"nope.pem") as info:
        X509Credentials.from_files(missing, pki.server.key)
    assert info.value.status == errno.ENOKEY
    with pytest.raises(CredentialError, match=r"private key .*nope.pem"):
        X509Credentials.from_files(pki.server.cert, missing)


def test_unreadable_file_is_named(pki: PKI, tmp_path: Path) -> None:
    # A directory where a file is expected (chmod 000 does not stop root).
    with pytest.raises(CredentialError, match=f"cannot read certificate {tmp_path}"):
        X509Credentials.from_files(tmp_path, pki.server.key)
    if os.geteuid() != 0:
        locked = tmp_path / "locked.key"
        locked.write_bytes(pki.server.key.read_bytes())
        locked.chmod(0)
        with pytest.raises(CredentialError, match=r"locked.key"):
            X509Credentials.from_files(pki.server.cert, locked)


def test_wrong_formats(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"server.key is not a PEM or DER X.509"):
        X509Credentials.from_files(pki.server.key, pki.server.key)
    with pytest.raises(CredentialError, match=r"server.crt is not a PEM or DER private key"):
        X509Credentials.from_files(pki.server.cert, pki.server.cert)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(CredentialError, match="junk is not"):
        X509Credentials.from_files(junk, pki.server.key)
    with pytest.raises(CredentialError, match="not valid DER"):
        X509Credentials.from_der(b"\x30\x03abc", pki.server.key_der)


def test_key_not_matching_certificate(pki: PKI) -> None:
    with pytest.raises(CredentialError, match="does not match") as info:
        X509Credentials.from_files(pki.server.cert, pki.client.key)
    assert str(pki.server.cert) in str(info.value)
    assert_no_key_material(str(info.value), pki.client.key.read_bytes())
    assert_no_key_material(str(info.value), pki.client.key_der)


def test_encrypted_key_is_refused(pki: PKI, tmp_path: Path) -> None:
    key = tmp_path / "enc.key"
    key.write_bytes(
        pki.server.issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(CredentialError, match=r"enc.key is encrypted"):
        X509Credentials.from_files(pki.server.cert, key)


def test_key_type_that_cannot_sign(pki: PKI, tmp_path: Path) -> None:
    key = tmp_path / "x25519.key"
    key.write_bytes(
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CredentialError, match="cannot sign"):
        X509Credentials.from_files(pki.server.cert, key)


def test_certificate_without_key(pki: PKI) -> None:
    with pytest.raises(CredentialError, match="needs its private key"):
        credentials.client_context(pki.ca, pki.client.cert, None)


# -- trust stores ---------------------------------------------------------------------


def server_ctx(pki: PKI, truststore: Path | None = None, require: bool = False) -> SSL.Context:
    return credentials.server_context(
        pki.server.cert, pki.server.key, truststore or pki.ca, require
    )


def test_trust_store_file_and_hashed_directory(pki: PKI) -> None:
    for store in (pki.ca, pki.ca_dir):
        client_session, _ = handshake(credentials.client_context(store), server_ctx(pki))
        assert client_session.peer_certificate_der == pki.server.cert_der


def test_missing_or_empty_trust_store(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"trust store .*absent.pem"):
        credentials.client_context(tmp_path / "absent.pem")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(CredentialError, match=r"empty.pem holds no PEM certificates"):
        credentials.client_context(empty)


def last_certificate(bundle: Path) -> x509.Certificate:
    # Only one: some distribution roots have serials cryptography warns about.
    end = b"-----END CERTIFICATE-----"
    pem = bundle.read_bytes().rstrip().rsplit(end, 2)[-2].rsplit(b"-----BEGIN", 1)[-1]
    return x509.load_pem_x509_certificate(b"-----BEGIN" + pem + end + b"\n")


def test_system_trust_store_is_really_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = next((Path(b) for b in credentials.SYSTEM_CA_BUNDLES if Path(b).is_file()), None)
    if bundle is None:
        pytest.skip("no distribution CA bundle on this machine")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    root = last_certificate(bundle)
    ctx = credentials.client_context(None)
    store = ctx.get_cert_store()  # borrowed from ctx: keep ctx alive
    assert store is not None
    # A self-signed root verifies only if it is in the store.
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(root)).verify_certificate()
    del ctx


def test_control_root_not_in_a_private_store(pki: PKI) -> None:
    bundle = next((Path(b) for b in credentials.SYSTEM_CA_BUNDLES if Path(b).is_file()), None)
    if bundle is None:
        pytest.skip("no distribution CA bundle on this machine")
    root = last_certificate(bundle)
    ctx = credentials.client_context(pki.ca)
    store = ctx.get_cert_store()
    assert store is not None
    with pytest.raises(crypto.X509StoreContextError):
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(root)).verify_certificate()
    del ctx


def test_client_certificate_from_untrusted_ca_needs_its_ca(pki: PKI) -> None:
    client = credentials.client_context(pki.ca, pki.client.cert, pki.client.key)
    _, server_session = handshake(client, server_ctx(pki, require=True))
    assert server_session.peer_certificate_der == pki.client.cert_der


def test_contexts_from_der_credentials(pki: PKI) -> None:
    server_creds = X509Credentials.from_der(pki.server_rsa.cert_der, pki.server_rsa.key_der)
    client_creds = X509Credentials.from_der(pki.client.cert_der, pki.client.key_der)
    client_session, server_session = handshake(
        credentials.client_context_from_credentials(pki.ca, client_creds),
        credentials.server_context_from_credentials(server_creds, pki.ca, True),
    )
    assert client_session.peer_certificate_der == pki.server_rsa.cert_der
    assert server_session.peer_certificate_der == pki.client.cert_der


# -- context settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("require", "request_cert", "mode"),
    [
        (True, True, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT),
        (False, True, SSL.VERIFY_PEER),
        (False, False, SSL.VERIFY_NONE),
    ],
)
def test_server_verify_modes(pki: PKI, require: bool, request_cert: bool, mode: int) -> None:
    ctx = credentials.server_context(
        pki.server.cert, pki.server.key, pki.ca, require, request_client_cert=request_cert
    )
    assert ctx.get_verify_mode() == mode


def test_common_context_settings(pki: PKI) -> None:
    for ctx in (credentials.client_context(pki.ca), server_ctx(pki)):
        assert _openssl.has_keylog_callback(ctx)
        assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF
        assert ctx.set_options(0) & SSL.OP_NO_TICKET
    assert credentials.client_context(pki.ca).get_verify_mode() == SSL.VERIFY_PEER


@pytest.mark.parametrize("suites", ["", "  ", "TLS_NOT_A_SUITE", "caf\u00e9"])
def test_bad_cipher_suite_list(pki: PKI, suites: str) -> None:
    with pytest.raises(ConfigError):
        credentials.client_context(pki.ca, ciphersuites=suites)


def test_context_is_reusable_for_many_handshakes(pki: PKI) -> None:
    client_ctx, srv = credentials.client_context(pki.ca), server_ctx(pki)
    seen = {handshake(client_ctx, srv)[0].tx_secret for _ in range(5)}
    assert len(seen) == 5
