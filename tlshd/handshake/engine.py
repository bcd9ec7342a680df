"""Sans-I/O TLS 1.3 handshake engine over OpenSSL memory BIOs.

Theory of operation
-------------------
The kernel hands tlshd a connected TCP socket and takes it back once the
handshake is done: from then on every byte on the socket belongs to kTLS.
Two things follow, and this engine exists to get them exactly right.

1. **Never read past the handshake.** The peer may send application data (or,
   as a server, NewSessionTicket records) right behind its Finished, possibly in
   the same TCP segment. Bytes read from the socket by user space are lost to
   kTLS. So input is framed here, outside OpenSSL: the engine buffers what it
   receives and writes *one whole TLS record* at a time into OpenSSL's read
   BIO, driving ``do_handshake`` after each, and stops the moment the handshake
   completes. Nothing past the completing record ever enters OpenSSL; it stays
   in :attr:`HandshakeEngine.trailing_data`. :class:`NeedData` tells the caller
   exactly how many bytes finish the current record (5 for a header, then the
   body), so a caller that ``recv()``s at most that many never over-reads and
   ``trailing_data`` stays empty. RFC 8446 section 5.1 makes this sound: the
   Finished message precedes a key change and "MUST be sent in alignment with a
   record boundary", so the handshake always ends at a record boundary.

2. **Never write past the handshake.** OpenSSL's TLS 1.3 server writes
   NewSessionTicket records (two by default) in the same ``do_handshake``
   call that processes the client's Finished, and the binding under pyOpenSSL
   has no ``SSL_CTX_set_num_tickets`` to turn them off (``SSL_OP_NO_TICKET``
   only makes them stateful). The NFS client discards such records but the
   NVMe/TCP host fails the queue with EINVAL (kernel-handshake-api.md 4.1,
   4.3), and kTLS would start at the wrong ``rec_seq``. A TLS 1.3 server has
   no handshake message left to send once the client's Finished has arrived,
   so everything a server writes in its completing call is post-handshake:
   it is withheld from :meth:`HandshakeEngine.data_to_send` and counted in
   ``SessionResult.dropped_post_handshake_records``. A client's completing
   call writes its final flight (Certificate, CertificateVerify, Finished),
   which must go out, and nothing after it. Contexts from
   :mod:`tlshd.credentials.builders` also disable the session cache, so the
   withheld tickets could not resume a session anyway and no PSK or early data
   can ever be accepted.

Secrets come from OpenSSL's key-log callback, which pyOpenSSL installs per
``SSL.Context`` and calls with the ``Connection``: each engine registers itself
as the connection's app data and :func:`route_keylog_line` hands the line to
it. Only the two application traffic secrets are kept.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from collections.abc import Callable
from typing import Literal, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from tlshd.errors import (
    CredentialError,
    DecodeError,
    PeerAuthenticationError,
    PeerClosedError,
    PeerProtocolError,
    TlshdError,
    UnknownPSKIdentityError,
    UnsupportedRequestError,
)
from tlshd.handshake import _openssl, _psk
from tlshd.handshake.events import (
    Event,
    HandshakeComplete,
    HandshakeFailed,
    NeedData,
    NeedServerCredentials,
    SessionResult,
)
from tlshd.handshake.hello import HelloCollector, HelloTooLargeError, offered_identities
from tlshd.handshake.secrets import Role, SecretCollector
from tlshd.untrusted import show

__all__ = ["HandshakeEngine", "Role", "route_keylog_line"]

RECORD_HEADER_LEN = 5
# RFC 8446 section 5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_RECORD_BODY_LEN = 2**14 + 256
# change_cipher_spec, alert, handshake, application_data (RFC 8446 section 5.1)
TLS_CONTENT_TYPES = frozenset({20, 21, 22, 23})
_BIO_CHUNK = 65536

# OpenSSL reasons for a received alert: "sslv3 alert handshake failure",
# "tlsv1 alert unknown ca", "tlsv13 alert certificate required", ...
_ALERT_REASON = re.compile(r"\balert (?P<name>[a-z0-9 ]+)")


def route_keylog_line(conn: SSL.Connection, line: bytes) -> None:
    """Key-log callback for contexts that engines use: forward to the engine.

    Runs inside OpenSSL (via cffi), so it must not raise.
    """
    engine = conn.get_app_data()
    if isinstance(engine, HandshakeEngine):
        engine._remember_secret(line)




def parse_record_header(header: bytes) -> tuple[int, int]:
    """Return (content type, body length); raise PeerProtocolError if not TLS."""
    content_type, major, length = header[0], header[1], int.from_bytes(header[3:5], "big")
    if content_type not in TLS_CONTENT_TYPES or major != 3:
        raise PeerProtocolError(f"peer did not send a TLS record (header {header.hex()})")
    if length > MAX_RECORD_BODY_LEN:
        raise PeerProtocolError(f"peer sent a TLS record of {length} bytes (limit 2^14+256)")
    return content_type, length


def count_records(data: bytes) -> int:
    """Number of TLS records in ``data`` (which OpenSSL wrote: well formed)."""
    count, offset = 0, 0
    while offset + RECORD_HEADER_LEN <= len(data):
        offset += RECORD_HEADER_LEN + int.from_bytes(data[offset + 3 : offset + 5], "big")
        count += 1
    return count


ConnectionHook = Callable[[SSL.Connection], None]
# RFC 8446 §6: alert(21), TLS 1.2 record version, length 2, fatal(2), unknown_psk_identity(115)
ALERT_UNKNOWN_PSK_IDENTITY = bytes([21, 3, 3, 0, 2, 2, 115])
ALERT_ILLEGAL_PARAMETER = bytes([21, 3, 3, 0, 2, 2, 47])  # OpenSSL's for an excessive size
ALERT_UNEXPECTED_MESSAGE = bytes([21, 3, 3, 0, 2, 2, 10])


def _check_context(context: SSL.Context) -> None:
    if not _openssl.has_keylog_callback(context):
        raise ValueError(
            "SSL.Context has no key-log callback: build it with tlshd.credentials.builders"
        )


class State(enum.Enum):
    """Where an engine is. ``HELLO_PENDING``: a server that awaits credentials holds the
    client's records until its ClientHello is whole (no OpenSSL connection yet). ``ASKING``:
    :class:`NeedServerCredentials` is out, unanswered. ``RUNNING``: OpenSSL drives the
    handshake. ``DONE`` and ``FAILED`` are final."""

    HELLO_PENDING = "hello pending"
    ASKING = "asking"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


FINAL = frozenset({State.DONE, State.FAILED})


class HandshakeEngine:
    """One TLS 1.3 handshake, bytes in and bytes out (see the module docstring).

    ``context`` comes from :mod:`tlshd.credentials.builders` (it must carry
    :func:`route_keylog_line`). A client sends SNI for a DNS ``peername`` and
    has OpenSSL check the server certificate against it during the handshake
    (DNS SAN, or IP SAN for an IPv4/IPv6 literal); with no ``peername`` only
    the chain is verified. A server ignores ``peername``.

    Bytes produced by a step (the next flight, or the alert of a failure) are
    in :meth:`data_to_send` by the time :meth:`next_event` reports it, so
    send them first, as in::

        engine = HandshakeEngine(ctx, Role.CLIENT, peername="server.example")
        while True:
            sock.sendall(engine.data_to_send())
            event = engine.next_event()
            if not isinstance(event, NeedData):
                break
            engine.receive_data(sock.recv(event.max_bytes))
        sock.sendall(engine.data_to_send())   # e.g. the alert after a failure
    """

    def __init__(
        self,
        context: SSL.Context,
        role: Role,
        *,
        peername: str | None = None,
        cn_fallback: bool = False,
        on_connection: ConnectionHook | None = None,
        await_credentials: bool = False,
        timer: Callable[[], float] | None = None,
        keylog: Callable[[bytes], None] | None = None,
    ) -> None:
        """``cn_fallback`` (client): a server certificate without subjectAltName may match
        ``peername`` by its subject CN; off by default (RFC 9525 6.3, RFC 9289 5.2).
        ``on_connection`` runs on the new ``SSL.Connection`` before any byte is made
        (e.g. to attach a PSK). ``await_credentials`` (server): once the ClientHello is
        whole, :meth:`next_event` is :class:`NeedServerCredentials` until the caller
        answers with :meth:`use_credentials` or :meth:`refuse`; ``context`` is then only the
        fallback for input that is not a ClientHello. ``timer`` (e.g. ``time.perf_counter``)
        measures the time spent inside OpenSSL (``tls_seconds``); ``keylog`` receives each
        NSS key-log line (``SSLKEYLOGFILE``). The engine itself reads no clock, file,
        keyring or socket."""
        _check_context(context)
        self._role = role
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._held = bytearray()  # whole records held until the ClientHello is complete
        self._hello = HelloCollector()
        self._first_flight = False  # the peer's first message is whole (see first_flight_in)
        self._secrets = SecretCollector()
        self._result: HandshakeComplete | HandshakeFailed | None = None
        self._peername = peername
        self._cn_fallback = cn_fallback
        self._fallback = context
        self._awaiting = await_credentials and role is Role.SERVER
        self._pending: NeedServerCredentials | None = None  # asked, not yet answered
        self._timer = timer
        self._keylog = keylog
        self._connection: SSL.Connection | None = None  # None: held for the ClientHello
        self.state = State.HELLO_PENDING if self._awaiting else State.RUNNING
        self.tls_seconds = 0.0  # time inside OpenSSL (do_handshake): the rest is ours
        if not self._awaiting:
            self._connect(context, on_connection)

    def _connect(self, context: SSL.Context, hook: ConnectionHook | None) -> None:
        _check_context(context)
        self._connection = SSL.Connection(context, None)
        self.state = State.RUNNING
        self._conn.set_app_data(self)
        if hook is not None:
            hook(self._conn)
        if self._role is Role.CLIENT:
            self._conn.set_connect_state()
            if self._peername is not None:
                _expect_peername(self._conn, self._peername, self._cn_fallback)
            self._step(started=False)  # writes the ClientHello
        else:
            self._conn.set_accept_state()

    @property
    def _conn(self) -> SSL.Connection:
        assert self._connection is not None, "no OpenSSL connection before the ClientHello"
        return self._connection

    # -- public API ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Give the engine bytes read from the peer; ``b""`` means it closed."""
        if self.state in FINAL:
            self._inbuf += data  # past the end: the caller must hand these on
            return
        if not data:
            self._fail(PeerClosedError(self._closed_message()))
            return
        self._inbuf += data
        self._feed_records()

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (send them even after a failure)."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def next_event(self) -> Event:
        if self._result is not None:  # DONE or FAILED
            return self._result
        if self._pending is not None:  # ASKING
            return self._pending
        return NeedData(self._bytes_to_record_end())

    def use_credentials(self, context: SSL.Context, hook: ConnectionHook | None = None) -> None:
        """The answer to :class:`NeedServerCredentials`: go on with ``context`` (and
        ``hook`` on the new connection, e.g. to attach the PSK found)."""
        if self.state is not State.ASKING or self._pending is None:
            raise RuntimeError("use_credentials without NeedServerCredentials")
        self._pending = None
        self._start_held(context, hook)
        self._feed_records()  # what the client sent meanwhile

    def refuse(self, error: TlshdError) -> None:
        """The other answer: the handshake fails with ``error``; an unknown PSK identity
        gets the ``unknown_psk_identity`` alert (RFC 8446 4.2.11), anything else none."""
        if self.state is not State.ASKING or self._pending is None:
            raise RuntimeError("refuse without NeedServerCredentials")
        self._pending = None
        self._held.clear()
        if isinstance(error, UnknownPSKIdentityError):
            self._outbuf += ALERT_UNKNOWN_PSK_IDENTITY
        self._fail(error)

    def absorb_post_handshake(self, record: bytes) -> bytes:
        """One whole record a server sent after a completed client handshake, read by
        OpenSSL with the session's keys: a NewSessionTicket (OpenSSL and GnuTLS servers send
        them), which a kTLS socket would hand the application's ``read`` as EIO. Returns the
        application data the record carried (b"" for a post-handshake message). Anything
        OpenSSL would answer (a KeyUpdate that asks for ours) fails: kTLS could not follow."""
        if not isinstance(self._result, HandshakeComplete) or self._role is not Role.CLIENT:
            raise RuntimeError("absorb_post_handshake before a client handshake completed")
        conn = self._conn
        conn.bio_write(record)
        try:
            data: bytes = conn.recv(MAX_RECORD_BODY_LEN)
        except SSL.WantReadError:
            data = b""
        except SSL.ZeroReturnError:
            raise PeerClosedError("the server closed the session after the handshake") from None
        except SSL.Error as exc:
            raise self._classify(exc) from None
        if self._drain_bio():
            raise PeerProtocolError("the server asked for an answer right after the handshake "
                                    "(a KeyUpdate): kTLS could not follow it")
        return data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of a completed handshake (kTLS's data)."""
        if isinstance(self._result, HandshakeComplete):
            return bytes(self._inbuf)
        return b""

    # -- input framing -----------------------------------------------------------

    def _bytes_to_record_end(self) -> int:
        if len(self._inbuf) < RECORD_HEADER_LEN:
            return RECORD_HEADER_LEN - len(self._inbuf)
        length = int.from_bytes(self._inbuf[3:5], "big")
        return RECORD_HEADER_LEN + length - len(self._inbuf)

    def _feed_records(self) -> None:
        while (self.state in (State.HELLO_PENDING, State.RUNNING)
               and len(self._inbuf) >= RECORD_HEADER_LEN):
            header = bytes(self._inbuf[:RECORD_HEADER_LEN])
            try:
                _, length = parse_record_header(header)
            except PeerProtocolError as exc:
                self._reject(header, exc)
                return
            end = RECORD_HEADER_LEN + length
            if len(self._inbuf) < end:
                return
            record = bytes(self._inbuf[:end])
            del self._inbuf[:end]
            if self.state is State.HELLO_PENDING:
                self._hold(record)
                continue
            if not self._first_flight and not self._watch_first_flight(record):
                return
            self._conn.bio_write(record)
            self._step(started=True)

    @property
    def first_flight_in(self) -> bool:
        """The peer has sent its first message whole: a server has the ClientHello, a client
        the first record of the server's reply. Until then a peer holds a slot for nothing
        (the worker gives it a shorter deadline)."""
        return self._first_flight

    def _watch_first_flight(self, record: bytes) -> bool:
        """Note when the first message is whole; False if it was refused (over the limit)."""
        if self._role is Role.CLIENT:
            self._first_flight = True
            return True
        try:
            self._first_flight = self._hello.feed(record) is not None
        except HelloTooLargeError as exc:
            self._outbuf += ALERT_ILLEGAL_PARAMETER
            self._fail(PeerProtocolError(str(exc)))
            return False
        except DecodeError:
            self._first_flight = True  # not a ClientHello: OpenSSL's verdict comes at once
        return True

    def _hold(self, record: bytes) -> None:
        """Server awaiting credentials: keep records until the ClientHello is whole."""
        self._held += record
        try:
            hello = self._hello.feed(record)
        except HelloTooLargeError as exc:
            self._held.clear()
            self._outbuf += ALERT_ILLEGAL_PARAMETER
            self._fail(PeerProtocolError(str(exc)))
            return
        except DecodeError:
            hello = b""  # not a ClientHello: the fallback context's OpenSSL will say why
        if hello is None:
            return
        self._first_flight = True
        if not hello:
            self._start_held(self._fallback, None)
            return
        try:
            identities = tuple(offered_identities(hello))
        except DecodeError:
            identities = ()  # OpenSSL will judge the hello once a context is chosen
        self._pending = NeedServerCredentials(hello, identities)
        self.state = State.ASKING

    def _start_held(self, context: SSL.Context, hook: ConnectionHook | None) -> None:
        self._connect(context, hook)
        self._conn.bio_write(bytes(self._held))
        self._held.clear()
        self._step(started=True)

    def _reject(self, header: bytes, exc: PeerProtocolError) -> None:
        """Not TLS: let OpenSSL see the header so it sends the alert it wants."""
        if self._connection is None:
            self._connect(self._fallback, None)
        self._conn.bio_write(header)
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            pass  # OpenSSL would wait for the body: our own verdict stands
        except SSL.Error as ssl_exc:
            exc = PeerProtocolError(f"{exc}: {_reason(ssl_exc)}")
        written = self._drain_bio()
        if not written and not self._first_flight and header[1] == 3:
            # a TLS-shaped record of a type TLS does not have, before the first message:
            # OpenSSL waits for its body; RFC 8446 5 wants unexpected_message now. (Bytes
            # that do not look like TLS at all, an HTTP request say, get no alert, as OpenSSL.)
            written = ALERT_UNEXPECTED_MESSAGE
        self._outbuf += written
        self._fail(exc)

    # -- driving OpenSSL -----------------------------------------------------------

    def _step(self, *, started: bool) -> None:
        begun = self._timer() if self._timer else 0.0
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._timed(begun)
            self._outbuf += self._drain_bio()
            return
        except SSL.Error as exc:
            self._timed(begun)
            self._outbuf += self._drain_bio()
            self._fail(self._classify(exc) if started else _local_failure(exc))
            return
        self._timed(begun)
        self._complete()

    def _timed(self, begun: float) -> None:
        if self._timer is not None:
            self.tls_seconds += self._timer() - begun

    def _drain_bio(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += self._conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                return bytes(out)

    def _complete(self) -> None:
        written = self._drain_bio()
        dropped = 0
        if self._role is Role.SERVER:
            dropped = count_records(written)  # NewSessionTicket: see module docstring
        else:
            self._outbuf += written  # the client's final flight
        try:
            session = self._session_result(dropped)
        except TlshdError as exc:
            self._fail(exc)
            return
        self._finish(HandshakeComplete(session))

    def _finish(self, result: HandshakeComplete | HandshakeFailed) -> None:
        self._result = result
        self.state = State.DONE if isinstance(result, HandshakeComplete) else State.FAILED
        if self._connection is not None:
            self._connection.set_app_data(None)  # break the engine <-> connection cycle
            _psk.detach(self._connection)
        self._secrets = SecretCollector()  # the secrets live on in the result only

    def _fail(self, error: TlshdError) -> None:
        self._finish(HandshakeFailed(error))

    # -- results ----------------------------------------------------------------

    def _remember_secret(self, line: bytes) -> None:
        if self._keylog is not None:
            self._keylog(line)
        # inside OpenSSL's callback: must not raise (OpenSSL's own lines are well formed)
        with contextlib.suppress(DecodeError):
            self._secrets.add_line(line)

    def _session_result(self, dropped: int) -> SessionResult:
        protocol = self._conn.get_protocol_version_name()
        if protocol != "TLSv1.3":
            raise PeerProtocolError(f"negotiated {protocol}, only TLSv1.3 is allowed")
        tx_secret, rx_secret = self._secrets.application_secrets(self._role)  # or EIO
        leaf, chain = _peer_certificates(self._conn)
        return SessionResult(
            cipher_name=self._conn.get_cipher_name() or "",
            protocol=protocol,
            tx_secret=tx_secret,
            rx_secret=rx_secret,
            peer_certificate_der=leaf,
            peer_chain_der=chain,
            dropped_post_handshake_records=dropped,
            group_name=_openssl.group_name(self._conn),
        )

    def _classify(self, exc: SSL.Error) -> TlshdError:
        if isinstance(exc, SSL.ZeroReturnError):
            return PeerClosedError("peer sent close_notify during the handshake")
        reason = _reason(exc)
        verify = _openssl.verify_error(self._conn)
        if verify is not None:
            return PeerAuthenticationError(f"peer certificate rejected: {verify}")
        alert = _ALERT_REASON.search(reason)
        if alert is not None:
            name = alert["name"].replace(" ", "_")
            if name == "unknown_psk_identity":
                return UnknownPSKIdentityError("peer sent alert: unknown_psk_identity")
            if name == "protocol_version":
                return PeerProtocolError(f"peer sent alert: {name}")
            return PeerAuthenticationError(f"peer sent alert: {name}")
        if "did not return a certificate" in reason:
            return PeerAuthenticationError("peer sent no certificate but one is required")
        if "unsupported protocol" in reason:
            return PeerProtocolError(f"peer does not offer TLS 1.3 ({reason})")
        return PeerProtocolError(f"TLS handshake failed: {reason}")

    def _closed_message(self) -> str:
        pending = f" ({len(self._inbuf)} bytes of a partial record)" if self._inbuf else ""
        return f"peer closed the connection during the handshake{pending}"


# -- helpers ---------------------------------------------------------------------


def _reason(exc: SSL.Error) -> str:
    """The OpenSSL reason strings from pyOpenSSL's error queue, joined."""
    queue = exc.args[0] if exc.args else []
    if not isinstance(queue, list):
        return str(queue)
    reasons = [str(item[-1]) for item in queue if isinstance(item, tuple) and item]
    return "; ".join(r for r in reasons if r) or "unknown OpenSSL error"


def _local_failure(exc: SSL.Error) -> TlshdError:
    """OpenSSL refused to start a handshake before the peer said anything."""
    return CredentialError(f"cannot start a TLS handshake with this context: {_reason(exc)}")


def _expect_peername(conn: SSL.Connection, peername: str, cn_fallback: bool = False) -> None:
    """SNI plus the in-handshake name check (DNS SAN, or IP SAN for literals; the subject CN
    only with ``cn_fallback``)."""
    name = peername.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        _openssl.set_verify_ip(conn, address.packed)  # RFC 6066 3: no SNI for IPs
        return
    host = name.rstrip(".")
    if not _usable_host_name(host):
        raise UnsupportedRequestError(f"peer name {show(peername)} is not a DNS name or IP "
                                      "address that fits in SNI")
    conn.set_tlsext_host_name(host.encode("ascii"))
    _openssl.set_verify_host(conn, host.encode("ascii"), cn_fallback=cn_fallback)


def _usable_host_name(host: str) -> bool:
    """What SNI and the certificate name check can carry (RFC 1035 2.3.4: 253 characters,
    labels of 1 to 63); anything else is the kernel side's mistake, EINVAL, not ours."""
    if not host or len(host) > 253 or not host.isascii():
        return False
    if any(c.isspace() or c == "\0" for c in host):
        return False
    return all(0 < len(label) <= 63 for label in host.split("."))


class _CryptographyPeerView(Protocol):
    """pyOpenSSL >= 24.3 API; the installed typeshed stubs for pyOpenSSL predate it."""

    def get_peer_certificate(
        self, *, as_cryptography: Literal[True]
    ) -> x509.Certificate | None: ...

    def get_verified_chain(
        self, *, as_cryptography: Literal[True]
    ) -> list[x509.Certificate] | None: ...


def _peer_certificates(conn: SSL.Connection) -> tuple[bytes | None, tuple[bytes, ...]]:
    """The peer's leaf and its verified chain (leaf first, up to the trust anchor), DER."""
    view = cast(_CryptographyPeerView, conn)
    leaf = view.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return None, ()
    leaf_der = leaf.public_bytes(Encoding.DER)
    chain = view.get_verified_chain(as_cryptography=True) or []
    ders = [cert.public_bytes(Encoding.DER) for cert in chain]
    if not ders or ders[0] != leaf_der:
        ders.insert(0, leaf_der)
    return leaf_der, tuple(ders)
