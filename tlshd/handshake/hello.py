"""The plaintext ClientHello, read before OpenSSL sees it (pure, bounded parsing).

A TLS 1.3 server with external PSKs must know which PSK the client offers
before OpenSSL picks a cipher suite: OpenSSL chooses the suite first and then
ignores a PSK whose hash differs. The engine holds the first records until
the ClientHello is whole and hands it to the server's context selector, which
reads the ``pre_shared_key`` identities (RFC 8446 §4.2.11) with this module.

The records are collected one at a time (:class:`HelloCollector`): each byte is copied once,
and a ClientHello that declares more than ``MAX_CLIENT_HELLO`` bytes is refused as soon as
its header says so, so a peer can make the agent neither buffer nor re-read more than that.
"""

from __future__ import annotations

import struct

from tlshd.errors import DecodeError

MAX_CLIENT_HELLO = 64 * 1024  # a post-quantum hello is 1-3 KiB; OpenSSL's own cap is 128 KiB
EXT_PRE_SHARED_KEY = 41
HANDSHAKE_CLIENT_HELLO = 1
CONTENT_HANDSHAKE = 22


class HelloTooLargeError(DecodeError):
    """The ClientHello declares more than the limit (OpenSSL: excessive message size)."""


class HelloCollector:
    """The ClientHello from the first handshake records, fed one whole record at a time."""

    def __init__(self, limit: int = MAX_CLIENT_HELLO) -> None:
        self._payload = bytearray()
        self._limit = limit
        self._total: int | None = None

    def feed(self, record: bytes) -> bytes | None:
        """The whole ClientHello once it is complete, else None; DecodeError if these are not
        the records of a ClientHello, HelloTooLargeError if it is over the limit."""
        if record[0] != CONTENT_HANDSHAKE:
            raise DecodeError(f"a record of type {record[0]} before the ClientHello was whole")
        self._payload += record[5:]
        if self._total is None and len(self._payload) >= 4:
            if self._payload[0] != HANDSHAKE_CLIENT_HELLO:
                raise DecodeError("first handshake message is not a ClientHello")
            self._total = 4 + int.from_bytes(self._payload[1:4], "big")
            if self._total > self._limit:
                raise HelloTooLargeError(f"ClientHello of {self._total} bytes: over the "
                                         f"{self._limit}-byte limit")
        if self._total is not None and len(self._payload) >= self._total:
            return bytes(self._payload[: self._total])
        return None


def client_hello_message(records: bytes) -> bytes | None:
    """The whole ClientHello from the first handshake records, None while incomplete."""
    collector, offset = HelloCollector(), 0
    while offset + 5 <= len(records):
        end = offset + 5 + struct.unpack_from(">H", records, offset + 3)[0]
        if end > len(records):
            return None
        hello = collector.feed(records[offset:end])
        if hello is not None:
            return hello
        offset = end
    return None


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
