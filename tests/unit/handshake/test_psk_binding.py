"""The private binding symbols the PSK support needs: a clear failure when one disappears."""

import pytest
from OpenSSL._util import ffi, lib

SYMBOLS = (
    "SSL_CTX_set_psk_use_session_callback",
    "SSL_CTX_set_psk_find_session_callback",
    "SSL_get1_session",
    "SSL_SESSION_free",
    "SSL_SESSION_set1_master_key",
    "SSL_SESSION_set_cipher",
    "SSL_SESSION_set_protocol_version",
    "SSL_CIPHER_find",
)


@pytest.mark.parametrize("name", SYMBOLS)
def test_binding_still_has(name):
    assert hasattr(lib, name), (
        f"the cryptography binding under pyOpenSSL lost {name}: tlshd/handshake/_psk.py "
        "needs it for TLS 1.3 PSKs; find a replacement before upgrading")


def test_callback_types_are_function_pointers():
    for setter in SYMBOLS[:2]:
        arg = ffi.typeof(getattr(lib, setter)).args[1]
        assert arg.kind == "function", f"{setter} no longer takes a callback: {arg}"


def test_both_ways_to_a_blank_session_give_one_openssl_accepts():
    """d2i of the template (cryptography >= 44) and the ClientHello's session (older)."""
    from tlshd.handshake import _psk

    makers = [_psk._blank_session_from_client_hello]
    if _psk.HAS_D2I_SESSION:
        makers.append(_psk._blank_session_from_template)
    for make in makers:
        sess = make()
        assert sess != ffi.NULL, make.__name__
        assert lib.SSL_SESSION_set1_master_key(sess, b"k" * 48, 48) == 1
        assert lib.SSL_SESSION_set_protocol_version(sess, 0x0304) == 1
        lib.SSL_SESSION_free(sess)
