"""The private binding symbols the PSK support needs: a clear failure when one disappears."""

import pytest
from OpenSSL._util import ffi, lib

SYMBOLS = (
    "SSL_CTX_set_psk_use_session_callback",
    "SSL_CTX_set_psk_find_session_callback",
    "d2i_SSL_SESSION",
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
