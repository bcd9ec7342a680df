"""The plaintext ClientHello, read before OpenSSL sees it (pure, bounded parsing).

A TLS 1.3 server with external PSKs must know which PSK the client offers
before OpenSSL picks a cipher suite: OpenSSL chooses the suite first and then
ignores a PSK whose hash differs. The engine holds the first records until
the ClientHello is whole and hands it to the server's context selector, which
reads the ``pre_shared_key`` identities (RFC 8446 §4.2.11) with this module.
"""

from __future__ import annotations

import struct

from tlshd.errors import DecodeError

EXT_PRE_SHARED_KEY = 41
HANDSHAKE_CLIENT_HELLO = 1
CONTENT_HANDSHAKE = 22


def client_hello_message(records: bytes) -> bytes | None:
    """The whole ClientHello from the first handshake records, None while incomplete."""
    payload, offset = b"", 0
    while offset + 5 <= len(records):
        content_type, length = records[offset], struct.unpack_from(">H", records, offset + 3)[0]
        if content_type != CONTENT_HANDSHAKE:
            break
        payload += records[offset + 5 : offset + 5 + length]
        offset += 5 + length
    if len(payload) < 4:
        return None
    if payload[0] != HANDSHAKE_CLIENT_HELLO:
        raise DecodeError("first handshake message is not a ClientHello")
    total = 4 + int.from_bytes(payload[1:4], "big")
    return payload[:total] if len(payload) >= total else None


def offered_identities(hello: bytes) -> list[bytes]:
    """PSK identities in a ClientHello message; DecodeError if it is malformed."""
    reader = _Reader(hello, 4)
    reader.skip(2 + 32)  # legacy_version, random
    reader.skip(reader.u8())  # legacy_session_id
    reader.skip(reader.u16())  # cipher_suites
    reader.skip(reader.u8())  # legacy_compression_methods
    extensions = _Reader(reader.take(reader.u16()), 0)
    while extensions.remaining():
        ext_type, body = extensions.u16(), extensions.take(extensions.u16())
        if ext_type == EXT_PRE_SHARED_KEY:
            return _identities(_Reader(body, 0))
    return []


def _identities(reader: _Reader) -> list[bytes]:
    ids = _Reader(reader.take(reader.u16()), 0)
    out = []
    while ids.remaining():
        out.append(ids.take(ids.u16()))
        ids.skip(4)  # obfuscated_ticket_age
    return out


class _Reader:
    """Bounded reads: every length is checked against what is left (DecodeError)."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data, self._offset = data, offset

    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, n: int) -> bytes:
        if n > self.remaining():
            raise DecodeError(f"ClientHello: {n} bytes wanted, {self.remaining()} left")
        chunk = self._data[self._offset : self._offset + n]
        self._offset += n
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")
