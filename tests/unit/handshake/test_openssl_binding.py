"""Canary for the private OpenSSL binding used by tlshd.handshake._openssl.

pyOpenSSL has no public API for the in-handshake host/IP check or the
verification result text, so tlshd calls into cryptography's cffi binding.
These tests fail with a message that says what to fix when a pyOpenSSL or
cryptography release renames or drops something.
"""

from __future__ import annotations

from pathlib import Path

import cryptography
import OpenSSL
import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from OpenSSL._util import lib

from tests.pki import write_pki
from tests.unit.handshake.pairing import drive
from tlshd.credentials import builders as creds
from tlshd.handshake import _openssl
from tlshd.handshake.engine import HandshakeEngine, Role
from tlshd.handshake.events import HandshakeComplete

VERSIONS = f"pyOpenSSL {OpenSSL.__version__}, cryptography {cryptography.__version__}"


@pytest.mark.parametrize("symbol", _openssl.REQUIRED_SYMBOLS)
def test_binding_exports_symbol(symbol: str) -> None:
    if not hasattr(lib, symbol):
        pytest.fail(
            f"{symbol} is gone from cryptography's OpenSSL binding ({VERSIONS}); "
            "tlshd.handshake._openssl needs another way to do what it did",
            pytrace=False,
        )


@pytest.mark.parametrize(
    ("cls", "attribute"),
    _openssl.REQUIRED_ATTRIBUTES,
    ids=[f"{cls.__name__}.{attr}" for cls, attr in _openssl.REQUIRED_ATTRIBUTES],
)
def test_pyopenssl_keeps_private_pointer(cls: type, attribute: str) -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    instance = ctx if cls is SSL.Context else SSL.Connection(ctx, None)
    if not hasattr(instance, attribute):
        pytest.fail(
            f"pyOpenSSL's {cls.__name__} no longer has {attribute} ({VERSIONS}); "
            "tlshd.handshake._openssl reads the OpenSSL pointer from it",
            pytrace=False,
        )


def test_pyopenssl_lib_is_cryptography_binding() -> None:
    # _openssl documents the two as one object; the pointers must be compatible.
    assert lib is Binding.lib


def test_check_binding_passes_and_names_missing_symbols(monkeypatch: pytest.MonkeyPatch) -> None:
    _openssl.check_binding()
    monkeypatch.setattr(
        _openssl, "REQUIRED_SYMBOLS", (*_openssl.REQUIRED_SYMBOLS, "SSL_no_such_function")
    )
    with pytest.raises(_openssl.BindingError, match="SSL_no_such_function"):
        _openssl.check_binding()


@pytest.mark.parametrize(
    ("cls", "method"),
    [
        (SSL.Connection, "get_verified_chain"),
        (SSL.Context, "set_keylog_callback"),
    ],
)
def test_public_pyopenssl_api_newer_than_its_typeshed_stubs(cls: type, method: str) -> None:
    assert hasattr(cls, method), f"pyOpenSSL ({VERSIONS}) lost {cls.__name__}.{method}"


@pytest.mark.parametrize("use_method", [True, False], ids=["pyopenssl-method", "binding"])
def test_tls13_suites_and_group_name_with_and_without_pyopenssl_s_methods(
        use_method: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pyOpenSSL < 25.1 (Debian trixie's 25.0.0) has neither method: the binding does it."""
    if use_method and not hasattr(SSL.Context, "set_tls13_ciphersuites"):
        pytest.skip(f"{VERSIONS} has no Context.set_tls13_ciphersuites")
    if not use_method:
        for cls, name in ((SSL.Context, "set_tls13_ciphersuites"),
                          (SSL.Connection, "get_group_name")):
            monkeypatch.delattr(cls, name, raising=False)
    ctx = SSL.Context(SSL.TLS_METHOD)
    with pytest.raises(SSL.Error):
        _openssl.set_tls13_ciphersuites(ctx, b"TLS_NO_SUCH_SUITE")
    pki = write_pki(tmp_path)
    client = creds.client_context(pki.ca, ciphersuites="TLS_AES_128_CCM_SHA256")
    server = creds.server_context(pki.server.cert, pki.server.key, None, False,
                                  request_client_cert=False,
                                  ciphersuites="TLS_AES_128_CCM_SHA256")
    result, _ = drive(HandshakeEngine(client, Role.CLIENT, peername="server.test"),
                      HandshakeEngine(server, Role.SERVER))
    assert isinstance(result, HandshakeComplete), result
    assert result.session.cipher_name == "TLS_AES_128_CCM_SHA256"
    if use_method or hasattr(lib, "SSL_get0_group_name"):
        assert result.session.group_name  # e.g. X25519MLKEM768 or X25519
    else:
        assert result.session.group_name is None  # cryptography 43: no API tells


def test_verify_parameters_accept_names_and_addresses() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    _openssl.set_verify_host(conn, b"server.test")
    _openssl.set_verify_ip(conn, bytes([127, 0, 0, 1]))
    _openssl.set_verify_ip(conn, bytes(15) + b"\x01")
    with pytest.raises(ValueError, match="4 or 16"):
        _openssl.set_verify_ip(conn, b"\x01\x02\x03\x04\x05")


def test_verify_error_is_none_before_any_verification() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    assert _openssl.verify_error(conn) is None


def test_keylog_callback_detection() -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    assert not _openssl.has_keylog_callback(ctx)
    ctx.set_keylog_callback(lambda conn, line: None)
    assert _openssl.has_keylog_callback(ctx)


def test_hint_if_ticket_count_becomes_settable() -> None:
    # The engine withholds OpenSSL's NewSessionTickets because the binding
    # lacks SSL_CTX_set_num_tickets. If it appears, setting 0 would be simpler.
    if hasattr(lib, "SSL_CTX_set_num_tickets"):
        pytest.skip("binding now exports SSL_CTX_set_num_tickets: consider setting it to 0")


def test_the_binding_cannot_answer_record_size_limit_in_tls13() -> None:
    """RFC 8449 in TLS 1.3 needs an extension in EncryptedExtensions (SSL_CTX_add_custom_ext
    with SSL_EXT_TLS1_3_ENCRYPTED_EXTENSIONS) and a way to keep our own records within the
    peer's limit (SSL_set_max_send_fragment). This binding has neither, only the TLS 1.2-only
    custom-extension calls (docs/migrating.md). When this fails, the binding has gained them:
    negotiate the limit then, and set TLS_TX_MAX_PAYLOAD_LEN where the kernel has it."""
    from OpenSSL._util import lib

    assert not hasattr(lib, "SSL_CTX_add_custom_ext")
    assert not hasattr(lib, "SSL_set_max_send_fragment")
    assert not hasattr(lib, "SSL_CTX_set_max_send_fragment")
