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
* ``SSL_CTX_set1_curves_list`` (``SSL_CTX_set1_groups_list`` is a macro for it): the
  key exchange groups and which of them get a key share; pyOpenSSL has no call for it.
  Optional (:data:`HAS_GROUPS`): the binding of cryptography 43 (Debian trixie's
  python3-cryptography) does not export it, and OpenSSL's own default groups then apply.
* ``SSL_CTX_set_ciphersuites`` and ``SSL_get0_group_name``: what pyOpenSSL's
  ``Context.set_tls13_ciphersuites`` and ``Connection.get_group_name`` do, for
  pyOpenSSL releases older than those methods (Debian trixie's python3-openssl 25.0.0
  has neither). The method is used where it exists, the binding otherwise.

The declared minimums (pyproject.toml) are tested: CI runs the unit and kernel-sim
suites once with pip constraints at the lower bounds (scripts/test-min-versions).
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
    "SSL_CTX_set_ciphersuites",
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


def set_verify_host(conn: SSL.Connection, host: bytes, *, cn_fallback: bool = False) -> None:
    """Require the peer certificate to match DNS name ``host`` (SAN dNSName). OpenSSL would
    fall back to the subject CN of a certificate without DNS names; only ``cn_fallback``
    lets it (X509_CHECK_FLAG_NEVER_CHECK_SUBJECT otherwise)."""
    param = _verify_param(conn)
    if not cn_fallback:
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT)
    if _lib.X509_VERIFY_PARAM_set1_host(param, host, len(host)) != 1:
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


def set_tls13_ciphersuites(context: SSL.Context, suites: bytes) -> None:
    """The TLS 1.3 cipher suites (OpenSSL names, ``:``-separated); SSL.Error if none is known."""
    method = getattr(context, "set_tls13_ciphersuites", None)
    if method is not None:
        method(suites)
        return
    if _lib.SSL_CTX_set_ciphersuites(context._context, suites) != 1:  # type: ignore[attr-defined, unused-ignore]
        raise SSL.Error([("", "SSL_CTX_set_ciphersuites", "no cipher match")])


def group_name(conn: SSL.Connection) -> str | None:
    """The negotiated key exchange group ("X25519MLKEM768"), None where no API tells.

    Only after the handshake: OpenSSL 4.0's SSL_get0_group_name crashes before one."""
    method = getattr(conn, "get_group_name", None)
    if method is not None:
        name = method()
        return str(name) if name else None
    if not hasattr(_lib, "SSL_get0_group_name"):
        return None
    text = _lib.SSL_get0_group_name(_ssl_ptr(conn))
    return None if text == _ffi.NULL else str(_ffi.string(text).decode())


HAS_GROUPS = hasattr(_lib, "SSL_CTX_set1_curves_list") and hasattr(_lib, "ERR_clear_error")


class GroupsUnsupportedError(BindingError):
    """This binding cannot set the key exchange groups (:data:`HAS_GROUPS` is false)."""


def set_groups(context: SSL.Context, groups: str) -> str:
    """Set the key exchange groups; returns the list in force. ``groups`` is in OpenSSL 3.5's
    syntax (``?`` skips a group this OpenSSL lacks, ``*`` gives it a key share in the
    ClientHello, `` / `` separates tuples of equal server preference). An older OpenSSL,
    which knows none of it, gets the plain list of the groups it has, and sends a key share
    for the first. SSL.Error if it has none of them."""
    if not HAS_GROUPS:
        raise GroupsUnsupportedError("this OpenSSL binding has no SSL_CTX_set1_groups_list")
    ctx = context._context  # type: ignore[attr-defined, unused-ignore]
    if _lib.SSL_CTX_set1_curves_list(ctx, groups.encode("ascii")) == 1:
        return groups
    _lib.ERR_clear_error()
    known = []
    for entry in groups.replace("/", ":").split(":"):
        name = entry.strip().lstrip("?*")
        if name and _lib.SSL_CTX_set1_curves_list(ctx, name.encode("ascii")) == 1:
            known.append(name)
        _lib.ERR_clear_error()
    if not known or _lib.SSL_CTX_set1_curves_list(ctx, ":".join(known).encode("ascii")) != 1:
        _lib.ERR_clear_error()
        raise SSL.Error([("", "SSL_CTX_set1_groups_list", f"no usable group in {groups!r}")])
    return ":".join(known)
