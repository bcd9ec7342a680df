"""Events returned by :meth:`tlshd.handshake.engine.HandshakeEngine.next_event`.

The engine reports exactly one of three things: it needs more bytes
(:class:`NeedData`), the handshake finished (:class:`HandshakeComplete`, with a
:class:`SessionResult` the kTLS installer consumes), or it failed
(:class:`HandshakeFailed`, carrying the :class:`~tlshd.errors.TlshdError`
whose ``status`` goes into DONE).

Traffic secrets live in :class:`SessionResult` only as long as the worker needs
them to program kTLS; they are excluded from ``repr`` so that logging a result
(or an event holding one) can never leak them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlshd.errors import TlshdError


@dataclass(frozen=True)
class NeedData:
    """The engine wants at most ``max_bytes`` more bytes from the peer.

    ``max_bytes`` is exactly what completes the TLS record being read (5 for a
    record header, then the record body), so a caller that never reads more
    than this never consumes a byte that follows the handshake.
    """

    max_bytes: int


@dataclass(frozen=True, repr=False)
class SessionResult:
    """What the kernel needs after a successful TLS 1.3 handshake.

    ``tx_secret`` is this side's application traffic secret 0 and
    ``rx_secret`` the peer's (RFC 8446 section 7.1); ``tx_seq``/``rx_seq``
    count records already protected under them (0: nothing was sent or read
    under the application keys). ``peer_chain_der`` is the peer's verified
    chain, leaf first, ending at the trust anchor; ``dropped_post_handshake_records`` counts records
    OpenSSL wrote after completion (NewSessionTicket) that were withheld from
    the wire because the kernel consumers cannot handle them.
    """

    cipher_name: str
    protocol: str
    tx_secret: bytes = field(repr=False)
    rx_secret: bytes = field(repr=False)
    tx_seq: int = 0
    rx_seq: int = 0
    peer_certificate_der: bytes | None = None
    peer_chain_der: tuple[bytes, ...] = ()
    dropped_post_handshake_records: int = 0
    group_name: str | None = None

    def __repr__(self) -> str:
        peer = f"{len(self.peer_chain_der)} cert(s)" if self.peer_certificate_der else "none"
        return (
            f"SessionResult(cipher_name={self.cipher_name!r}, protocol={self.protocol!r}, "
            f"group_name={self.group_name!r}, tx_seq={self.tx_seq}, rx_seq={self.rx_seq}, "
            f"peer={peer}, dropped_post_handshake_records="
            f"{self.dropped_post_handshake_records}, secrets=<hidden>)"
        )


@dataclass(frozen=True)
class NeedServerCredentials:
    """A server engine made with ``await_credentials`` has the whole ClientHello and waits
    for :meth:`~tlshd.handshake.engine.HandshakeEngine.use_credentials` or ``refuse``:
    the caller, not the engine, looks up keys. ``identities`` are the PSK identities the
    client offers, in its order (empty when it offers none or the hello is malformed)."""

    hello: bytes = field(repr=False)
    identities: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class HandshakeComplete:
    session: SessionResult


@dataclass(frozen=True)
class HandshakeFailed:
    error: TlshdError


Event = NeedData | NeedServerCredentials | HandshakeComplete | HandshakeFailed
