"""Key exchange groups (issue 16): one key share by default, the post-quantum hybrid first,
``[authenticate] groups`` in OpenSSL 3.5's syntax, and what an older OpenSSL does with it."""

from __future__ import annotations

import struct

import pytest
from OpenSSL import SSL

from tests.pki import PKI, write_pki
from tlshd.config import parse_config
from tlshd.credentials import builders
from tlshd.handshake import _openssl
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete, NeedData, SessionResult

X25519MLKEM768, X25519, SECP256R1 = 0x11EC, 0x001D, 0x0017
CLASSICAL = "?*X25519:?secp256r1:?X448:?secp384r1:?secp521r1"


def _has(group: str) -> bool:
    if not _openssl.HAS_GROUPS:
        return False
    try:
        return _openssl.set_groups(SSL.Context(SSL.TLS_CLIENT_METHOD), group) == group
    except SSL.Error:
        return False


HAS_HYBRID = _has("X25519MLKEM768")
needs_groups = pytest.mark.skipif(not _openssl.HAS_GROUPS,
                                  reason="this binding cannot set groups (cryptography 43)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


def client(pki: PKI, groups: str | None = None) -> SSL.Context:
    return builders.client_context(pki.ca, groups=groups)


def server(pki: PKI, groups: str | None = None) -> SSL.Context:
    return builders.server_context(pki.server.cert, pki.server.key, pki.ca, False, groups=groups)


def key_shares(client_hello_records: bytes) -> list[int]:
    """The groups of the key_share extension (51) of a ClientHello in one record."""
    body = client_hello_records[5 + 4:]  # record header, handshake header
    at = 2 + 32  # legacy_version, random
    at += 1 + body[at]  # legacy_session_id
    at += 2 + struct.unpack_from("!H", body, at)[0]  # cipher_suites
    at += 1 + body[at]  # legacy_compression_methods
    end = at + 2 + struct.unpack_from("!H", body, at)[0]
    at += 2
    while at < end:
        ext_type, ext_len = struct.unpack_from("!HH", body, at)
        if ext_type == 51:
            shares, pos, stop = [], at + 6, at + 4 + ext_len
            while pos < stop:
                group, length = struct.unpack_from("!HH", body, pos)
                shares.append(group)
                pos += 4 + length
            return shares
        at += 4 + ext_len
    return []


def pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[SessionResult, int]:
    """The client's session and how many flights the server sent before finishing (2 with a
    HelloRetryRequest: the HRR, then ServerHello...Finished)."""
    c = HandshakeEngine(client_ctx, Role.CLIENT, peername="server.test")
    s = HandshakeEngine(server_ctx, Role.SERVER)
    server_flights = 0
    for _ in range(20):
        data = c.data_to_send()
        if data and isinstance(s.next_event(), NeedData):
            s.receive_data(data)
        data = s.data_to_send()
        if data:
            server_flights += 1
            if isinstance(c.next_event(), NeedData):
                c.receive_data(data)
    result = c.next_event()
    assert isinstance(result, HandshakeComplete), result
    assert isinstance(s.next_event(), HandshakeComplete)
    return result.session, server_flights


@needs_groups
def test_the_default_sends_one_key_share_for_the_hybrid(pki: PKI) -> None:
    engine = HandshakeEngine(client(pki), Role.CLIENT, peername="server.test")
    expected = [X25519MLKEM768] if HAS_HYBRID else [X25519]
    assert key_shares(engine.data_to_send()) == expected


@needs_groups
def test_two_default_ends_agree_on_the_hybrid_without_a_retry(pki: PKI) -> None:
    session, flights = pair(client(pki), server(pki))
    assert session.group_name in (("X25519MLKEM768",) if HAS_HYBRID else ("x25519", "X25519"))
    assert flights == 1


@pytest.mark.skipif(not HAS_HYBRID, reason="this OpenSSL has no X25519MLKEM768")
def test_a_classical_server_costs_the_default_client_one_retry(pki: PKI) -> None:
    session, flights = pair(client(pki), server(pki, CLASSICAL))
    assert session.group_name in ("x25519", "X25519")
    assert flights == 2  # the HelloRetryRequest, then the server's flight


@pytest.mark.skipif(not HAS_HYBRID, reason="this OpenSSL has no X25519MLKEM768")
def test_a_default_server_asks_a_hybrid_capable_client_for_the_hybrid(pki: PKI) -> None:
    """The server's first tuple is the hybrid alone: a client that has it, but sent a share
    for X25519 only, is asked for it (post-quantum wins over one round trip)."""
    session, flights = pair(client(pki, "?*X25519:?X25519MLKEM768"), server(pki))
    assert session.group_name == "X25519MLKEM768"
    assert flights == 2


@needs_groups
def test_the_classical_list_sends_one_x25519_share(pki: PKI) -> None:
    engine = HandshakeEngine(client(pki, CLASSICAL), Role.CLIENT, peername="server.test")
    assert key_shares(engine.data_to_send()) == [X25519]
    session, flights = pair(client(pki, CLASSICAL), server(pki))
    assert session.group_name in ("x25519", "X25519")
    assert flights == 1


@needs_groups
def test_an_older_openssl_syntax_falls_back_to_the_names_it_has() -> None:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # a name no OpenSSL has, without "?": the 3.5 syntax refuses the whole list
    assert _openssl.set_groups(ctx, "*NoSuchGroup / X25519:secp256r1") == "X25519:secp256r1"


@needs_groups
def test_a_list_with_no_usable_group_is_an_error_for_the_binding() -> None:
    with pytest.raises(SSL.Error):
        _openssl.set_groups(SSL.Context(SSL.TLS_CLIENT_METHOD), "NoSuchGroup:Nor-This")


@needs_groups
def test_a_context_with_no_usable_group_logs_and_takes_the_default(
        pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    engine = HandshakeEngine(client(pki, "NoSuchGroup"), Role.CLIENT, peername="server.test")
    assert "no key exchange group of 'NoSuchGroup' is usable" in caplog.text
    assert len(key_shares(engine.data_to_send())) == 1


def test_the_config_key_is_read_and_a_bad_value_is_warned_about() -> None:
    assert parse_config(f"[authenticate]\ngroups={CLASSICAL}\n").groups == CLASSICAL
    config = parse_config("[authenticate]\ngroups=X25519;rm -rf\n")
    assert config.groups == ""
    assert any("[authenticate] groups: not a group list" in w for w in config.warnings)
    assert parse_config("").groups == ""


@needs_groups
def test_psk_contexts_take_the_groups_too() -> None:
    ctx = builders.psk_context(SSL.TLS_CLIENT_METHOD, "TLS_AES_128_GCM_SHA256", CLASSICAL)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    assert key_shares(conn.bio_read(65536)) == [X25519]


def test_a_binding_without_groups_keeps_openssls_defaults_and_says_so_once(
        pki: PKI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_openssl, "HAS_GROUPS", False)
    monkeypatch.setattr(builders, "_told_no_groups", False)
    client(pki)  # the default: nothing to say
    assert "cannot set key exchange groups" not in caplog.text
    client(pki, CLASSICAL)
    client(pki, CLASSICAL)
    assert caplog.text.count("cannot set key exchange groups") == 1
    with pytest.raises(_openssl.GroupsUnsupportedError):
        _openssl.set_groups(SSL.Context(SSL.TLS_CLIENT_METHOD), CLASSICAL)
    session, _ = pair(client(pki, CLASSICAL), server(pki))  # and it still works
    assert session.cipher_name
