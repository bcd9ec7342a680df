"""PSK identities, hashes and the ClientHello's offered identities (pure), plus keyring loading."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from tests.unit.handshake.pairing import drive
from tlshd import keyring
from tlshd.credentials.builders import psk_context
from tlshd.credentials.psk import (
    find_server_psk,
    hash_for,
    key_description,
    load_psk,
    next_client_psk,
)
from tlshd.errors import CredentialError, DecodeError, KeyRevokedError, UnknownPSKIdentityError
from tlshd.handshake import _psk
from tlshd.handshake.engine import (
    ALERT_ILLEGAL_PARAMETER,
    ALERT_UNKNOWN_PSK_IDENTITY,
    HandshakeEngine,
    Role,
)
from tlshd.handshake.events import HandshakeComplete, HandshakeFailed, NeedServerCredentials
from tlshd.handshake.hello import (
    MAX_CLIENT_HELLO,
    HelloCollector,
    HelloTooLargeError,
    client_hello_message,
    offered_identities,
)
from tlshd.handshake.secrets import HashAlg

SHA256_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256"
SHA384_SUITES = "TLS_AES_256_GCM_SHA384"


@pytest.mark.parametrize("identity, key_len, alg", [
    ("NVMe0R01 host sub", 32, HashAlg.SHA256),
    ("NVMe0R02 host sub", 48, HashAlg.SHA384),
    ("NVMe1R01 host sub digest=", 32, HashAlg.SHA256),
    ("NVMe1G02 host sub digest=", 48, HashAlg.SHA384),
    ("quic-psk", 32, HashAlg.SHA256),
    ("quic-psk", 48, HashAlg.SHA384),
])
def test_psk_hash_comes_from_the_nvme_identity_or_the_key_length(identity, key_len, alg):
    assert hash_for(identity, key_len) is alg


def test_nvme_identity_whose_key_length_does_not_match_its_hash_is_rejected():
    with pytest.raises(CredentialError) as info:
        hash_for("NVMe0R02 host sub", 32)
    assert info.value.status == errno.EKEYREJECTED


def test_nvme_identity_with_an_unknown_hash_field_is_einval():
    with pytest.raises(CredentialError) as info:
        hash_for("NVMe0R07 host sub", 32)
    assert info.value.status == errno.EINVAL


# --- ClientHello ------------------------------------------------------------------------


def _client_hello(identities: list[bytes]) -> bytes:
    """A ClientHello record from a real OpenSSL client offering these PSK identities."""
    ctx = psk_context(SSL.TLS_CLIENT_METHOD, SHA256_SUITES)
    conn = SSL.Connection(ctx, None)
    if identities:
        _psk.attach(conn, identities[0], b"k" * 32, _psk.SUITE_SHA256)
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    _psk.detach(conn)
    return conn.bio_read(65536)


def test_offered_identity_is_read_from_a_real_client_hello():
    records = _client_hello([b"NVMe0R01 host-a subsys-b"])
    hello = client_hello_message(records)
    assert hello is not None and offered_identities(hello) == [b"NVMe0R01 host-a subsys-b"]


def test_client_hello_without_psk_offers_nothing():
    hello = client_hello_message(_client_hello([]))
    assert hello is not None and offered_identities(hello) == []


def test_client_hello_split_over_records_is_whole_only_at_the_end():
    records = _client_hello([b"id"])
    body = records[5:]
    split = (bytes([22, 3, 3]) + len(body[:100]).to_bytes(2, "big") + body[:100]
             + bytes([22, 3, 3]) + len(body[100:]).to_bytes(2, "big") + body[100:])
    assert client_hello_message(split[: 5 + 100]) is None
    hello = client_hello_message(split)
    assert hello is not None and offered_identities(hello) == [b"id"]


@given(st.binary(max_size=600))
def test_malformed_client_hello_only_raises_decode_error(data):
    with contextlib.suppress(DecodeError):
        offered_identities(b"\x01" + len(data).to_bytes(3, "big") + data)


def test_every_truncation_of_a_client_hello_only_raises_decode_error():
    hello = client_hello_message(_client_hello([b"NVMe0R01 h s"]))
    assert hello is not None
    for cut in range(len(hello)):
        try:
            offered_identities(hello[:cut])
        except DecodeError:
            continue


# --- engines with PSKs, in memory ----------------------------------------------------------


def _pair(client_key: bytes, server_key: bytes | None, suites: str, suite: bytes,
          identity: bytes = b"NVMe0R01 h s"):
    client_ctx = psk_context(SSL.TLS_CLIENT_METHOD, suites)
    server_ctx = psk_context(SSL.TLS_SERVER_METHOD, suites)
    client = HandshakeEngine(client_ctx, Role.CLIENT,
                             on_connection=lambda c: _psk.attach(c, identity, client_key, suite))

    def answer(engine: HandshakeEngine, asked: NeedServerCredentials) -> None:
        assert asked.identities == tuple(offered_identities(asked.hello))
        if server_key is None or asked.identities != (identity,):
            engine.refuse(UnknownPSKIdentityError("unknown"))
            return
        engine.use_credentials(server_ctx, lambda c: _psk.attach(c, identity, server_key,
                                                                 suite))

    # no keyring, socket or clock: the test is the worker that answers the engine's question
    server = HandshakeEngine(server_ctx, Role.SERVER, await_credentials=True)
    return drive(client, server, answer=answer), server


@pytest.mark.parametrize("suites, suite, key_len, cipher", [
    (SHA256_SUITES, _psk.SUITE_SHA256, 32, "TLS_AES_128_GCM_SHA256"),
    (SHA384_SUITES, _psk.SUITE_SHA384, 48, "TLS_AES_256_GCM_SHA384"),
])
@pytest.mark.parametrize("d2i", [True, False], ids=["d2i-template", "clienthello-session"])
def test_psk_handshake_between_engines_agrees_on_keys(suites, suite, key_len, cipher, d2i,
                                                      monkeypatch):
    """Both ways to a blank SSL_SESSION: the DER template where the binding has
    d2i_SSL_SESSION, the ClientHello's session where it does not (cryptography 43)."""
    if d2i and not _psk.HAS_D2I_SESSION:
        pytest.skip("this binding has no d2i_SSL_SESSION (cryptography < 44)")
    monkeypatch.setattr(_psk, "HAS_D2I_SESSION", d2i)
    key = os.urandom(key_len)
    (client, server), _ = _pair(key, key, suites, suite)
    assert isinstance(client, HandshakeComplete) and isinstance(server, HandshakeComplete)
    assert client.session.cipher_name == server.session.cipher_name == cipher
    assert client.session.tx_secret == server.session.rx_secret
    assert client.session.peer_certificate_der is None  # no certificates in PSK mode


def test_different_keys_fail_on_both_sides():
    (client, server), _ = _pair(os.urandom(32), os.urandom(32), SHA256_SUITES, _psk.SUITE_SHA256)
    assert isinstance(server, HandshakeFailed) and isinstance(client, HandshakeFailed)


def test_unknown_identity_sends_unknown_psk_identity_and_the_client_says_ekeyrejected():
    client_ctx = psk_context(SSL.TLS_CLIENT_METHOD, SHA256_SUITES)
    server_ctx = psk_context(SSL.TLS_SERVER_METHOD, SHA256_SUITES)
    client = HandshakeEngine(client_ctx, Role.CLIENT, on_connection=lambda c: _psk.attach(
        c, b"who", os.urandom(32), _psk.SUITE_SHA256))

    server = HandshakeEngine(server_ctx, Role.SERVER, await_credentials=True)
    server.receive_data(client.data_to_send())
    asked = server.next_event()
    assert isinstance(asked, NeedServerCredentials) and asked.identities == (b"who",)
    assert server.data_to_send() == b""  # nothing is said before the answer
    server.refuse(UnknownPSKIdentityError("no PSK key for identity 'who'"))
    event = server.next_event()
    assert isinstance(event, HandshakeFailed) and event.error.status == errno.EKEYREJECTED
    alert = server.data_to_send()
    assert alert == ALERT_UNKNOWN_PSK_IDENTITY
    client.receive_data(alert)
    failed = client.next_event()
    assert isinstance(failed, HandshakeFailed) and failed.error.status == errno.EKEYREJECTED


# --- a hostile ClientHello: bounded and linear ---------------------------------------------


def _record(payload: bytes, content_type: int = 22) -> bytes:
    return bytes([content_type, 3, 3]) + len(payload).to_bytes(2, "big") + payload


def test_a_client_hello_declared_over_the_limit_is_refused_at_its_header():
    collector = HelloCollector()
    header = b"\x01" + (MAX_CLIENT_HELLO - 3).to_bytes(3, "big")  # 4 + that: one over
    with pytest.raises(HelloTooLargeError, match=f"over the {MAX_CLIENT_HELLO}-byte limit"):
        collector.feed(_record(header + b"\0" * 100))


def test_a_client_hello_at_the_limit_is_collected():
    body = b"\0" * (MAX_CLIENT_HELLO - 4)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    collector = HelloCollector()
    chunks = [message[i:i + 16384] for i in range(0, len(message), 16384)]
    results = [collector.feed(_record(chunk)) for chunk in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1) and results[-1] == message


def test_one_byte_records_are_each_copied_once():
    """A hello in one-byte records: the collector keeps one growing buffer (no re-parse of
    what it already holds, which made a streamed hello cost quadratic time)."""
    message = client_hello_message(_client_hello([b"id"]))
    assert message is not None
    collector = HelloCollector()
    for byte in message[:-1]:
        assert collector.feed(_record(bytes([byte]))) is None
    assert collector.feed(_record(message[-1:])) == message
    assert len(collector._payload) == len(message)


def test_a_record_of_another_type_before_the_hello_is_whole_is_a_decode_error():
    collector = HelloCollector()
    assert collector.feed(_record(b"\x01\x00\x01\x00")) is None
    with pytest.raises(DecodeError, match="type 23"):
        collector.feed(_record(b"data", 23))


def test_a_psk_server_refuses_a_huge_hello_with_an_alert_and_holds_nothing():
    server_ctx = psk_context(SSL.TLS_SERVER_METHOD, SHA256_SUITES)
    server = HandshakeEngine(server_ctx, Role.SERVER, await_credentials=True)
    server.receive_data(_record(b"\x01\xff\xff\xff" + b"\0" * 16380))  # declares 16 MiB
    event = server.next_event()  # failed, never asked
    assert isinstance(event, HandshakeFailed) and event.error.status == errno.EACCES
    assert "over the" in str(event.error)
    assert server.data_to_send() == ALERT_ILLEGAL_PARAMETER
    assert len(server._held) == 0


# --- keyrings ------------------------------------------------------------------------------


@pytest.fixture
def ring():
    serial = keyring.add_key("keyring", f"tlshd-unit-psk-{os.getpid()}", b"",
                             keyring.KEY_SPEC_SESSION_KEYRING)
    yield serial
    keyring.unlink_key(serial, keyring.KEY_SPEC_SESSION_KEYRING)


def test_client_psk_is_the_first_readable_peer_identity(ring):
    revoked = keyring.add_key("user", "NVMe0R01 a b", os.urandom(32), ring)
    keyring.revoke_key(revoked)
    good = keyring.add_key("user", "NVMe0R02 a b", os.urandom(48), ring)
    later = keyring.add_key("user", "NVMe0R01 c d", os.urandom(32), ring)
    psk, untried = next_client_psk((revoked, good, later))
    assert psk.serial == good and psk.hash_alg is HashAlg.SHA384
    assert untried == (later,)  # what a retry may try next
    assert psk.key.hex() not in repr(psk)


def test_client_psk_errors_are_the_first_identity_s(ring):
    revoked = keyring.add_key("user", "NVMe0R01 a b", os.urandom(32), ring)
    keyring.revoke_key(revoked)
    with pytest.raises(KeyRevokedError):
        next_client_psk((revoked,))
    with pytest.raises(CredentialError) as info:
        next_client_psk(())
    assert info.value.status == errno.EINVAL


def test_a_keyring_is_not_a_psk(ring):
    with pytest.raises(CredentialError) as info:
        load_psk(ring)
    assert info.value.status == errno.EKEYREJECTED


def test_server_finds_the_offered_identity_in_its_keyrings(ring):
    serial = keyring.add_key("user", "NVMe0R01 host sub", os.urandom(32), ring)
    found = find_server_psk([b"unknown", b"NVMe0R01 host sub"], [ring])
    assert found is not None and found.serial == serial
    assert find_server_psk([b"nobody"], [ring]) is None


def test_an_identity_is_looked_up_exactly(ring):
    """A key description is a C string: "<known>\\0junk" must not find <known>'s key."""
    keyring.add_key("user", "NVMe0R01 host sub", os.urandom(32), ring)
    for offered in (b"NVMe0R01 host sub\0junk", b"NVMe0R01 host sub\xff", b"",
                    b"NVMe0R01 host sub" + b"x" * 5000):
        assert find_server_psk([offered], [ring]) is None, offered[:40]
    assert key_description(b"NVMe0R01 host sub") == "NVMe0R01 host sub"


def test_the_engine_names_its_states_along_a_psk_server_handshake():
    """HELLO_PENDING until the ClientHello is whole, ASKING until the worker answers, then
    RUNNING and DONE; a refusal ends in FAILED; no answer is taken out of turn."""
    from tlshd.handshake.engine import State

    seen: list[State] = []
    key, identity = os.urandom(32), b"NVMe0R01 h s"
    client = HandshakeEngine(psk_context(SSL.TLS_CLIENT_METHOD, SHA256_SUITES), Role.CLIENT,
                             on_connection=lambda c: _psk.attach(c, identity, key,
                                                                 _psk.SUITE_SHA256))
    server_ctx = psk_context(SSL.TLS_SERVER_METHOD, SHA256_SUITES)
    server = HandshakeEngine(server_ctx, Role.SERVER, await_credentials=True)
    assert server.state is State.HELLO_PENDING and client.state is State.RUNNING
    with pytest.raises(RuntimeError):
        server.use_credentials(server_ctx)  # nothing was asked yet

    def answer(engine: HandshakeEngine, asked: NeedServerCredentials) -> None:
        seen.append(engine.state)
        engine.use_credentials(server_ctx, lambda c: _psk.attach(c, identity, key,
                                                                 _psk.SUITE_SHA256))
        seen.append(engine.state)

    drive(client, server, answer=answer)
    assert seen == [State.ASKING, State.RUNNING]
    assert server.state is client.state is State.DONE

    refused = HandshakeEngine(server_ctx, Role.SERVER, await_credentials=True)
    other = HandshakeEngine(psk_context(SSL.TLS_CLIENT_METHOD, SHA256_SUITES), Role.CLIENT,
                            on_connection=lambda c: _psk.attach(c, identity, key,
                                                                _psk.SUITE_SHA256))
    drive(other, refused, answer=lambda e, a: e.refuse(UnknownPSKIdentityError("no")))
    assert refused.state is State.FAILED
