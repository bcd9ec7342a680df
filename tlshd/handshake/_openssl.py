"""Hazmat: the few OpenSSL calls pyOpenSSL has no public API for.

Everything here reaches past pyOpenSSL into the cffi binding that
``cryptography`` ships (``OpenSSL._util.lib`` is
``cryptography.hazmat.bindings.openssl.binding.Binding.lib``) and into
pyOpenSSL's private ``Connection._ssl`` / ``Context._context`` pointers.
A wrong argument here is memory corruption, not an exception, so:

* the module stays tiny, each function does one call and checks its result;
* :data:`REQUIRED_SYMBOLS` and :data:`REQUIRED_ATTRIBUTES` list every private
  name used, and :func:`check_binding` (run by the unit tests) fails loudly
  if a future pyOpenSSL/cryptography release drops one;
* nothing else in tlshd imports ``OpenSSL._util`` or the binding.

Why each call is needed:

* ``SSL_get0_param`` + ``X509_VERIFY_PARAM_set1_host`` / ``set1_ip``: the
  peer name check runs *inside* OpenSSL's chain verification, so a mismatch
  aborts the handshake with the proper alert (bad_certificate) instead of
  being checked after the fact on a connection the peer thinks is up.
* ``SSL_get_verify_result`` + ``X509_verify_cert_error_string``: turn
  "certificate verify failed" into the reason ("certificate has expired").
* ``SSL_CTX_get_keylog_callback``: an engine refuses a context without the
  key-log callback, since that is where the traffic secrets come from.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

REQUIRED_SYMBOLS: tuple[str, ...] = (
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set1_host",
    "X509_VERIFY_PARAM_set1_ip",
    "SSL_get_verify_result",
    "X509_verify_cert_error_string",
    "SSL_CTX_get_keylog_callback",
)

# (pyOpenSSL class, private attribute holding the OpenSSL pointer)
REQUIRED_ATTRIBUTES: tuple[tuple[type, str], ...] = (
    (SSL.Connection, "_ssl"),
    (SSL.Context, "_context"),
)

X509_V_OK = 0


class BindingError(RuntimeError):
    """The private OpenSSL binding lacks something tlshd relies on."""


def check_binding() -> None:
    """Raise :class:`BindingError` naming every missing symbol."""
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(_lib, name)]
    if missing:
        raise BindingError(
            "cryptography's OpenSSL binding no longer exports "
            + ", ".join(missing)
            + "; tlshd.handshake._openssl needs a replacement"
        )


def _ssl_ptr(conn: SSL.Connection) -> Any:
    return conn._ssl  # type: ignore[attr-defined, unused-ignore]


def _verify_param(conn: SSL.Connection) -> Any:
    param = _lib.SSL_get0_param(_ssl_ptr(conn))
    if param == _ffi.NULL:
        raise BindingError("SSL_get0_param returned NULL")
    return param


def set_verify_host(conn: SSL.Connection, host: bytes) -> None:
    """Require the peer certificate to match DNS name ``host`` (SAN dNSName)."""
    if _lib.X509_VERIFY_PARAM_set1_host(_verify_param(conn), host, len(host)) != 1:
        raise ValueError("OpenSSL rejected the host name for verification")


def set_verify_ip(conn: SSL.Connection, packed: bytes) -> None:
    """Require the peer certificate to carry IP SAN ``packed`` (4 or 16 bytes)."""
    if len(packed) not in (4, 16):
        raise ValueError("an IP address is 4 or 16 bytes")
    if _lib.X509_VERIFY_PARAM_set1_ip(_verify_param(conn), packed, len(packed)) != 1:
        raise ValueError("OpenSSL rejected the IP address for verification")


def verify_error(conn: SSL.Connection) -> str | None:
    """OpenSSL's text for the chain verification failure, or None if it passed."""
    code = int(_lib.SSL_get_verify_result(_ssl_ptr(conn)))
    if code == X509_V_OK:
        return None
    text = _lib.X509_verify_cert_error_string(code)
    return f"verify error {code}" if text == _ffi.NULL else _ffi.string(text).decode()


def has_keylog_callback(context: SSL.Context) -> bool:
    ctx_ptr = context._context  # type: ignore[attr-defined, unused-ignore]
    return bool(_lib.SSL_CTX_get_keylog_callback(ctx_ptr) != _ffi.NULL)
