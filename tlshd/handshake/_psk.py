"""TLS 1.3 external PSKs through OpenSSL's session callbacks (private binding: hazmat).

Why this way: pyOpenSSL has no PSK API. The binding under it has the legacy
``SSL_CTX_set_psk_{client,server}_callback``, but in TLS 1.3 those always use
SHA-256, and NVMe/TCP needs SHA-384 PSKs too. The session callbacks
(``SSL_CTX_set_psk_use_session_callback`` / ``..._find_session_callback``)
take an ``SSL_SESSION`` carrying the key, the cipher (whose hash is the PSK's
hash) and the protocol version. The binding lacks ``SSL_SESSION_new``, so a
session is made by ``d2i_SSL_SESSION`` of a minimal DER template (RFC-less
OpenSSL ``SSL_SESSION_ASN1``: version 1, TLS 1.3, a cipher id, empty session
id, a placeholder master key), then its key, cipher and version are set with
the public setters. OpenSSL takes ownership of the session it is handed.

Bindings older than cryptography 44 (Debian trixie's python3-cryptography 43.0.0)
have no ``d2i_SSL_SESSION`` either. There the new, empty session is the one OpenSSL
creates for a client connection when it writes its ClientHello: a throwaway
connection on a private context writes one into a memory BIO and
``SSL_get1_session`` takes a reference to its session before the connection is
freed. That costs one ClientHello (a key share) per PSK handshake, on those old
bindings only.

The callbacks are installed once per context; the PSK of each handshake is
attached to its ``SSL*`` in a registry and detached when the engine finishes.
Callbacks run inside OpenSSL and never raise: a failure returns 0 (fatal).
Every symbol used is checked by tests/unit/handshake/test_psk_binding.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

TLS1_3_VERSION = 0x0304
SUITE_SHA256 = b"\x13\x01"  # TLS_AES_128_GCM_SHA256: the session's cipher fixes the hash
SUITE_SHA384 = b"\x13\x02"  # TLS_AES_256_GCM_SHA384


def _tlv(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


_TEMPLATE = _tlv(0x30, b"".join([
    _tlv(0x02, b"\x01"),  # SSL_SESSION_ASN1_VERSION
    _tlv(0x02, b"\x03\x04"),  # ssl_version: TLS 1.3
    _tlv(0x04, SUITE_SHA256),  # cipher (replaced)
    _tlv(0x04, b""),  # session_id
    _tlv(0x04, b"\x00" * 32),  # master_key (replaced)
]))


@dataclass(eq=False)
class _Attached:
    identity: bytes
    key: bytes = field(repr=False)
    suite: bytes
    identity_buf: Any = None  # keeps the identity alive while OpenSSL points at it


_registry: dict[int, _Attached] = {}


def _address(ssl: Any) -> int:
    return int(ffi.cast("uintptr_t", ssl))


def _blank_session_from_template() -> Any:
    buf = ffi.new("unsigned char[]", _TEMPLATE)
    ptr = ffi.new("unsigned char **", buf)
    return lib.d2i_SSL_SESSION(ffi.NULL, ffi.cast("const unsigned char **", ptr), len(_TEMPLATE))


_throwaway_context: SSL.Context | None = None


def _blank_session_from_client_hello() -> Any:
    """The session OpenSSL makes for a client's ClientHello (see the module docstring)."""
    global _throwaway_context  # noqa: PLW0603 - built once, on old bindings only
    if _throwaway_context is None:
        _throwaway_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        _throwaway_context.set_min_proto_version(SSL.TLS1_3_VERSION)
        _throwaway_context.set_max_proto_version(SSL.TLS1_3_VERSION)
    conn = SSL.Connection(_throwaway_context, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass  # the ClientHello is written and waits for an answer that never comes
    except SSL.Error:
        return ffi.NULL
    return lib.SSL_get1_session(conn._ssl)


def blank_session() -> Any:
    """A new TLS 1.3 SSL_SESSION owned by the caller, or NULL."""
    if HAS_D2I_SESSION:
        return _blank_session_from_template()
    return _blank_session_from_client_hello()


HAS_D2I_SESSION = hasattr(lib, "d2i_SSL_SESSION")


def _session(ssl: Any, att: _Attached) -> Any:
    """A new SSL_SESSION for ``att`` (owned by the caller), or NULL."""
    sess = blank_session()
    if sess == ffi.NULL:
        return ffi.NULL
    cipher = lib.SSL_CIPHER_find(ssl, att.suite)
    ok = (cipher != ffi.NULL
          and lib.SSL_SESSION_set1_master_key(sess, att.key, len(att.key)) == 1
          and lib.SSL_SESSION_set_cipher(sess, cipher) == 1
          and lib.SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION) == 1)
    if not ok:
        lib.SSL_SESSION_free(sess)
        return ffi.NULL
    return sess


def _use_session(ssl: Any, md: Any, idp: Any, idlenp: Any, sessp: Any) -> int:
    """Client: offer the attached PSK (``md`` is set on a HelloRetryRequest: same suite)."""
    att = _registry.get(_address(ssl))
    if att is None:
        sessp[0] = ffi.NULL
        return 1
    sess = _session(ssl, att)
    if sess == ffi.NULL:
        return 0
    att.identity_buf = ffi.new("unsigned char[]", att.identity)
    idp[0], idlenp[0], sessp[0] = att.identity_buf, len(att.identity), sess
    return 1


def _find_session(ssl: Any, identity: Any, identity_len: int, sessp: Any) -> int:
    """Server: the attached PSK if the client offered its identity, else no PSK."""
    att = _registry.get(_address(ssl))
    sessp[0] = ffi.NULL
    if att is None or ffi.buffer(identity, identity_len)[:] != att.identity:
        return 1
    sess = _session(ssl, att)
    if sess == ffi.NULL:
        return 0
    sessp[0] = sess
    return 1


_USE_CB = ffi.callback(ffi.typeof(lib.SSL_CTX_set_psk_use_session_callback).args[1],
                       _use_session, error=0)
_FIND_CB = ffi.callback(ffi.typeof(lib.SSL_CTX_set_psk_find_session_callback).args[1],
                        _find_session, error=0)


def enable_client_psk(ctx: SSL.Context) -> None:
    lib.SSL_CTX_set_psk_use_session_callback(ctx._context, _USE_CB)


def enable_server_psk(ctx: SSL.Context) -> None:
    lib.SSL_CTX_set_psk_find_session_callback(ctx._context, _FIND_CB)


def attach(conn: SSL.Connection, identity: bytes, key: bytes, suite: bytes) -> None:
    """Give this handshake its PSK (client: the one to offer; server: the one to accept)."""
    _registry[_address(conn._ssl)] = _Attached(identity, key, suite)


def detach(conn: SSL.Connection) -> None:
    _registry.pop(_address(conn._ssl), None)
