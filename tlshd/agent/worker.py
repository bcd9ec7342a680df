"""A worker: ACCEPTs requests and runs many handshakes at once in one process.

Theory of operation
-------------------
Each worker process owns an ``Upcall`` (ACCEPT must run in the process that
will own the socket fd) and a selector loop. A READY, or a one-second sweep
that recovers READYs lost to a full multicast queue, makes it ACCEPT until
EAGAIN or until it holds ``max_inflight`` handshakes; while it is full the
rest wait in the kernel's queue (whose cap pushes back on the consumers with
EAGAIN), and each finished handshake makes room for the next at once. Each accepted request
becomes a ``Handshake``: a non-blocking socket, a sans-I/O engine and a
deadline (the ACCEPT timeout, else the configured default).

The engine says how many bytes finish the current TLS record; the worker
``recv``s at most that, so nothing the peer sends after its Finished is
consumed: it stays in the socket for the kernel. On completion the worker
derives the kTLS parameters, installs them through the upcall's setsockopt
port, sends DONE (status 0, the peer identity) and closes its fd. On failure
it sends the engine's alert (best effort), DONE with the error's status and
closes. A handshake that raises anything unexpected ends in DONE(EIO): no
request is ever left without a DONE while the worker lives, and one bad
handshake never stops the loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from tlshd.agent.events import Done, EventSink, Limit, Start
from tlshd.agent.ratelimit import FailureLimiter, source_of
from tlshd.appserver import is_app_request
from tlshd.credentials.chooser import Chooser, ContextProvider, PSKChoice
from tlshd.credentials.keys import LOCAL_KEYS, RequestKeys
from tlshd.credentials.psk import PSK
from tlshd.errors import (
    CredentialError,
    HandshakeTimeoutError,
    NetlinkError,
    PeerClosedError,
    PeerLimitError,
    RemoteError,
    TlshdError,
    TransportError,
    TransportTimeoutError,
    UnsupportedProtocolError,
    UnsupportedRequestError,
)
from tlshd.handshake import _psk
from tlshd.handshake.engine import (
    RECORD_HEADER_LEN,
    HandshakeEngine,
    Role,
    parse_record_header,
)
from tlshd.handshake.events import (
    HandshakeComplete,
    HandshakeFailed,
    NeedData,
    NeedServerCredentials,
    SessionResult,
)
from tlshd.handshake.secrets import HashAlg
from tlshd.keylog import KEYLOG
from tlshd.ktls import install_ktls, ktls_params_from_secrets, suite_from_openssl_name
from tlshd.netlink.messages import AcceptReply
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.tags import TagSet
from tlshd.untrusted import show
from tlshd.upcall import BrokenAcceptError, Upcall

log = logging.getLogger("tlshd")
io_log = logging.getLogger("tlshd.io")  # [debug] tls > 0

SWEEP_INTERVAL_S = 1.0


@dataclass(eq=False)
class PostHandshake:
    """An application's client handshake is complete; the server's NewSessionTickets follow
    its Finished, and a kTLS socket would hand them to the application's ``read`` as EIO.
    So the worker reads whole records until ``until`` (twice the handshake's time, within
    POST_WAIT_S, for the first; two round trips after each one) and OpenSSL takes them;
    kTLS then starts after them (``records``). A record
    of application data ends the wait at once: ``data`` goes to the application in its
    answer, and everything after it is kTLS's."""

    session: SessionResult
    until: float
    wait: float  # how long a quiet socket is waited for the first record
    last: float  # the latest ``until`` may be (POST_WAIT_S[1] after the handshake)
    buf: bytearray = field(default_factory=bytearray)
    records: int = 0
    data: bytes = b""


POST_WAIT_S = (0.005, 0.2)  # the least and the most an application's client waits
_TCPI_RTT = struct.Struct("=I")  # struct tcp_info's tcpi_rtt (µs), at offset 68
_TCPI_RTT_OFFSET = 68


def _quiet_after_record(sock: socket.socket) -> float:
    """How long a socket must stay quiet after a post-handshake record before kTLS takes
    it: two smoothed round trips (TCP_INFO), at least POST_WAIT_S[0]."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        (rtt_us,) = _TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)
    except (OSError, struct.error):
        return POST_WAIT_S[0] * 4
    return max(POST_WAIT_S[0], 2 * int(rtt_us) / 1e6)


@dataclass(eq=False)
class Handshake:
    reply: AcceptReply
    sock: socket.socket
    engine: HandshakeEngine
    deadline: float
    started: float
    file_flags: int
    psk: PSKChoice
    out: bytearray = field(default_factory=bytearray)
    # CPU (thread time) this process spent on this request, OpenSSL included, from the ACCEPT
    # reply to DONE; ``pass_begun``: when the current pass over it began (0: none runs)
    busy_s: float = 0.0
    pass_begun: float = 0.0
    tls_s: float = 0.0  # CPU inside OpenSSL in earlier attempts (a PSK retry)
    nodelay: int = 0  # TCP_NODELAY as the consumer had it: restored before DONE
    addr: str = "-"  # the peer's address, for the log
    first_deadline: float = float("inf")  # the peer's first message must be whole by then
    source: str = ""  # a server handshake's client address, for the per-peer limit
    after: PostHandshake | None = None  # an application's client: records after the handshake

    @property
    def role(self) -> str:
        return _role(self.reply)


def warm_up(contexts: ContextProvider) -> float:
    """One PSK handshake in memory, both sides in this process, with a throwaway key: what
    OpenSSL and this package set up on first use (the TLS 1.3 state machine, the key
    exchange, HKDF, the AEAD, the session callbacks, the key-log path) is then paid before the
    first request, not by it. Returns the CPU seconds it took; a failure is logged, never
    raised (the requests then pay as before)."""
    begun = time.thread_time()
    try:
        psk = PSK(serial=0, identity=b"tlshd warm-up", key=os.urandom(32), hash_alg=HashAlg.SHA256)
        attach = lambda conn: _psk.attach(conn, psk.identity, psk.key, psk.suite)  # noqa: E731
        client = HandshakeEngine(contexts.psk_client[HashAlg.SHA256], Role.CLIENT,
                                 on_connection=attach)
        server = HandshakeEngine(contexts.psk_server[HashAlg.SHA256], Role.SERVER,
                                 on_connection=attach)
        for _ in range(8):
            for sender, receiver in ((client, server), (server, client)):
                data = sender.data_to_send()
                if data and isinstance(receiver.next_event(), NeedData):
                    receiver.receive_data(data)  # (b"" would mean the peer closed)
        if not isinstance(client.next_event(), HandshakeComplete):
            log.warning("warm-up handshake did not complete: %s", client.next_event())
    except Exception:  # never a reason not to serve
        log.exception("warm-up handshake failed")
    return time.thread_time() - begun


def _check_request(reply: AcceptReply, sock: socket.socket) -> None:
    """What ktls-utils refuses before any TLS: a socket that is not TCP (src/tlshd/handshake.c:
    "Unsupported ip_proto", EOPNOTSUPP; QUIC is not served here), and a client x509 or
    anonymous request without a peer name, which no certificate could be checked against
    (ktls-utils main, #160: "a client handshake request that carries no peer name is
    rejected"). A PSK client needs no name: the key is the identity."""
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    if proto != socket.IPPROTO_TCP:
        raise UnsupportedProtocolError(f"IP protocol {proto} (only TCP is served)")
    if (reply.message_type == MsgType.CLIENTHELLO and reply.auth_mode != AuthMode.PSK
            and not reply.peername):
        raise UnsupportedRequestError("client request without a peer name: the server's "
                                      "certificate could not be checked")


def _push_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY on for the handshake, as ktls-utils does (tlshd_save_nagle): each flight
    goes out at once instead of waiting on the peer's delayed ACK. Returns the old value."""
    try:
        old = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return 0
    return 1 if old else 0


STALE_LIMIT = 64 * 1024


def _discard_stale(sock: socket.socket) -> bool:
    """Drop what the peer sent in a failed attempt (the rest of its flight, its alert), so
    that a retry starts on a clean stream. False: the peer has closed, or keeps sending."""
    dropped = 0
    while dropped < STALE_LIMIT:
        try:
            data = sock.recv(STALE_LIMIT, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        dropped += len(data)
    return False


def _internal(exc: BaseException) -> TlshdError:
    return TlshdError(f"internal error: {type(exc).__name__}", status=errno.EIO)


def _role(reply: AcceptReply) -> str:
    return "client" if reply.message_type == MsgType.CLIENTHELLO else "server"


def _auth_name(reply: AcceptReply) -> str:
    return str(getattr(reply.auth_mode, "name", reply.auth_mode))


def _log_result(reply: AcceptReply, status: int, elapsed_ms: float, what: str,
                netns: str = "-", addr: str = "-") -> None:
    """One line per request: namespace, role, auth mode, peer (the name the kernel gave, and
    the address), DONE status, duration, outcome (ok + cipher and the peer certificate's
    subject, or why it failed)."""
    log.info("handshake netns=%s role=%s auth=%s peer=%s addr=%s status=%d %.1fms %s%s",
             netns, _role(reply), _auth_name(reply), reply.peername or "-", addr, status,
             elapsed_ms, what, f" app_pid={reply.header.pid}" if is_app_request(reply) else "")


def _source(sock: socket.socket) -> str:
    """The peer's address without its port: what the per-peer limit counts."""
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


def _silent(hs: Handshake, now: float) -> bool:
    return hs.first_deadline <= now and not hs.engine.first_flight_in


def _deadline_of(hs: Handshake) -> float:
    if hs.after is not None:  # a record begun before the wait ended is read whole
        return hs.deadline if hs.after.buf else min(hs.deadline, hs.after.until)
    return hs.deadline if hs.engine.first_flight_in else min(hs.deadline, hs.first_deadline)


def _record_need(buf: bytearray) -> int:
    """How many bytes complete the record that ``buf`` begins (0: it is whole)."""
    if len(buf) < RECORD_HEADER_LEN:
        return RECORD_HEADER_LEN - len(buf)
    _, length = parse_record_header(bytes(buf[:RECORD_HEADER_LEN]))
    return RECORD_HEADER_LEN + length - len(buf)


def _peer_address(sock: socket.socket) -> str:
    """The peer's address in presentation form (ktls-utils c0f034b), or "-"."""
    try:
        name = sock.getpeername()
    except OSError:
        return "-"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    return "-"


def _subject_text(der: bytes | None) -> str | None:
    """The peer certificate's subject, RFC 4514 ("" without one, None if unparsable)."""
    if not der:
        return ""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return None


def _subject(text: str | None) -> str:
    """That subject for the log: escaped and bounded."""
    if text is None:
        return " subject=(unparsable)"
    return " subject=" + show(text, 200) if text else ""


def netns_label() -> str:
    """This process's network namespace: its ``ip netns`` name if it has one, else
    ``net:[inode]`` as /proc shows it."""
    try:
        inode = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return "-"
    with contextlib.suppress(OSError):
        for entry in os.scandir("/run/netns"):
            with contextlib.suppress(OSError):
                if entry.stat().st_ino == inode:
                    return entry.name
    return f"net:[{inode}]"


PeerIdentity = Callable[[SessionResult], int]


def peer_identity_key(session: SessionResult, keys: RequestKeys = LOCAL_KEYS) -> int:
    """The serial of a key holding the verified peer certificate, or 0 (no certificate)."""
    der = session.peer_certificate_der
    return keys.peer_key(der) if der else 0


# ACCEPT errors that no retry will cure (no CAP_NET_ADMIN, no such family or op): the worker
# exits with the error and the supervisor's restart says so loudly, instead of a worker that
# looks ready while every request times out
# A TLS record: alert (21), TLS 1.2 record version, length 2, fatal (2) access_denied (49)
ACCESS_DENIED_ALERT = bytes([21, 3, 3, 0, 2, 2, 49])
FATAL_ACCEPT_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL})
MAX_REFUSED_PER_ROUND = 8


class Worker:
    def __init__(
        self,
        upcall: Upcall,
        contexts: ContextProvider,
        *,
        default_timeout_ms: int = 10_000,
        max_inflight: int = 16,
        peer_identity: PeerIdentity | None = None,
        keys: RequestKeys = LOCAL_KEYS,
        clock: Callable[[], float] = time.monotonic,
        events: EventSink | None = None,
        debug_io: bool = False,
        delay_done_s: float = 0.0,
        log_success: bool = True,
        cn_fallback: bool = False,
        first_flight_timeout_ms: int = 2_000,
        max_inflight_per_peer: int = 64,
        max_waiting: int = 256,
        failure_log_burst: int = 5,
        tags: TagSet | None = None,
    ) -> None:
        self.upcall = upcall
        # session tags (tlshd.tags): matched on a server handshake's peer certificate
        self._tags = tags if tags else None
        self._default_timeout_s = default_timeout_ms / 1000
        self._max_inflight = max_inflight
        self._keys = keys
        self._peer_identity = peer_identity or (lambda session: peer_identity_key(session, keys))
        self._clock = clock
        self._events: EventSink = events or (lambda event: None)
        # an EventBatch (tlshd.agent.events) sends what a loop turn gathered at its end
        self._flush_events: Callable[[], None] = getattr(events, "flush", lambda: None)
        self._debug_io = debug_io
        # [debug] delay_done: each DONE is held this long (ktls-utils src/tlshd/netlink.c sleeps
        # in its per-request process; here the loop goes on serving the others meanwhile)
        self._delay_done_s = delay_done_s
        self._log_success = log_success  # [agent] log_success: failures are always logged
        # [agent] first_flight_timeout_ms, max_inflight_per_peer: a peer that connects and
        # says nothing holds a slot that long at most, and one address only so many slots
        self._first_flight_s = first_flight_timeout_ms / 1000
        self._per_peer = max_inflight_per_peer
        self._max_waiting = max_waiting
        # [agent] failure_log_burst: that many failure lines per source in 10 s, then a summary
        self._failures = FailureLimiter(burst=failure_log_burst)
        # what the engines may not do themselves: read the clock, write SSLKEYLOGFILE
        # which credentials each request uses; cn_fallback: CN-only server certificates
        self._chooser = Chooser(contexts, keys, cn_fallback=cn_fallback, engine_io={
            "timer": time.thread_time, "keylog": KEYLOG.write if KEYLOG.path else None})
        self.by_source: dict[str, int] = {}
        self._held: list[tuple[float, socket.socket, int, tuple[int, ...],
                               AcceptReply | None, tuple[str, ...],
                               tuple[str, str, bytes]]] = []
        self.netns = netns_label()
        self._sel = selectors.DefaultSelector()
        self._sel.register(upcall.notify_fileno(), selectors.EVENT_READ, None)
        self.inflight: dict[int, Handshake] = {}
        self.draining = False
        self.completed = 0
        self.failed = 0
        self._next_sweep = 0.0
        self._full = False  # the last ACCEPT round stopped at max_inflight, not at EAGAIN

    # --- loop -------------------------------------------------------------------

    def run_once(self, max_wait: float = SWEEP_INTERVAL_S) -> None:
        """One turn: wait for I/O or the next deadline, then serve what is ready."""
        now = self._clock()
        if not self.draining and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._accept_all()
        for key, events in self._sel.select(self._wait_time(max_wait)):
            if key.data is None:
                self._on_ready()
            else:
                self._service(key.data, events)
        self._expire()
        self._send_held(self._clock())
        for source, held in self._failures.due(self._clock()):
            log.warning("%d more failed handshake(s) with %s in %.0f s, not logged one by one",
                        held, source, self._failures.window_s)
        if self._full and self._has_room() and not self.draining:
            self._accept_all()  # room again: the next queued request, without a READY
        self._flush_events()

    def _wait_time(self, max_wait: float) -> float:
        now = self._clock()
        soonest = min((_deadline_of(h) for h in self.inflight.values()), default=now + max_wait)
        if self._held:
            soonest = min(soonest, self._held[0][0])
        return max(0.0, min(max_wait, soonest - now, self._next_sweep - now))

    def _on_ready(self) -> None:
        try:
            self.upcall.drain_notifications()
        except TransportError as exc:
            log.error("upcall: %s", exc)
            raise
        if not self.draining:
            self._accept_all()

    def _accept_all(self) -> None:
        self._full = False
        refused = 0
        while True:
            if not self._has_room():
                self._full = True  # requests may be waiting: refill as handshakes end
                return
            try:
                reply = self.upcall.accept()
            except BrokenAcceptError as broken:
                self._answer_broken(broken)
                continue
            except TransportTimeoutError as exc:  # a slow kernel side: try again next sweep
                log.warning("upcall: %s", exc)
                return
            except NetlinkError as exc:
                if exc.errno == errno.EPERM:  # GENL_ADMIN_PERM on 6.12.117 and 7.3
                    raise NetlinkError(exc.errno, "ACCEPT (the agent needs CAP_NET_ADMIN)"
                                       ) from None
                if exc.errno in FATAL_ACCEPT_ERRNOS:  # the agent cannot ACCEPT at all: say so
                    raise
                # that request's trouble (EIO, ENOMEM, ...): the next one may be fine
                log.error("upcall: %s; going on with the next request", exc)
                refused += 1
                if refused >= MAX_REFUSED_PER_ROUND:
                    return  # the next READY or sweep tries again
                continue
            if reply is None:
                return
            self._start(reply)

    def _has_room(self) -> bool:
        """``max_inflight`` counts the handshakes that cost CPU: every client, and servers
        that have their ClientHello. A server still waiting for it costs an fd and a
        deadline (``first_flight_timeout_ms``) and waits beside the rest (up to
        ``max_waiting``, see ``_make_waiting_room``), so silent connections cannot take the
        slots of good ones."""
        return len(self.inflight) - len(self._waiting()) < self._max_inflight

    def _waiting(self) -> list[Handshake]:
        return [h for h in self.inflight.values() if h.source and not h.engine.first_flight_in]

    def _make_waiting_room(self) -> None:
        """At ``max_waiting``, the server handshake that has waited longest for its
        ClientHello goes (a good client sends it within milliseconds): new requests are
        never shut out, and a flood of silent connections only ever evicts its own kind."""
        waiting = self._waiting()
        if len(waiting) < self._max_waiting:
            return
        oldest = min(waiting, key=lambda h: h.started)
        self._events(Limit("max_waiting"))
        self._end(oldest, HandshakeTimeoutError(
            f"no ClientHello yet, and {self._max_waiting} server handshakes wait for theirs "
            "([agent] max_waiting): the oldest makes room"))

    def _answer_broken(self, broken: BrokenAcceptError) -> None:
        log.error("malformed ACCEPT reply: %s", broken.error)
        if broken.sockfd is not None:
            self._done(broken.sockfd, broken.error.status, ())
            with contextlib.suppress(OSError):
                os.close(broken.sockfd)

    # --- one request -------------------------------------------------------------

    def _start(self, reply: AcceptReply) -> None:
        now, begun = self._clock(), time.thread_time()
        self._events(Start())
        try:
            sock = socket.socket(fileno=reply.sockfd)
        except OSError as exc:
            self._report(reply, errno.EBADF, 0.0, f"refused: accepted fd is not a socket: {exc}")
            self._done(reply.sockfd, errno.EBADF, ())
            with contextlib.suppress(OSError):
                os.close(reply.sockfd)
            return
        source = _source(sock) if reply.message_type == MsgType.SERVERHELLO else ""
        try:
            _check_request(reply, sock)
            self._check_source(source)
            engine, choice = self._chooser.start(reply)
        except TlshdError as exc:
            self._finish_early(reply, sock, exc)
            return
        except Exception as exc:  # a bug in one request must not stop the loop
            log.exception("request setup crashed")
            self._finish_early(reply, sock, _internal(exc))
            return
        # O_NONBLOCK lives in the file the kernel consumer shares: restored before DONE.
        file_flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
        sock.setblocking(False)
        nodelay = _push_nodelay(sock)
        timeout_s = reply.timeout_ms / 1000 if reply.timeout_ms else self._default_timeout_s
        hs = Handshake(reply, sock, engine, deadline=now + timeout_s, started=now,
                       file_flags=file_flags, psk=choice, nodelay=nodelay,
                       addr=_peer_address(sock),
                       # a server's client must speak first and soon; a client waits on a
                       # server its consumer chose, under the request's own deadline
                       first_deadline=now + self._first_flight_s if source else float("inf"),
                       source=source)
        if source:
            self._make_waiting_room()
            self.by_source[source] = self.by_source.get(source, 0) + 1
        hs.busy_s = time.thread_time() - begun  # the ACCEPT reply, engine set-up, a ClientHello
        self.inflight[sock.fileno()] = hs
        self._sel.register(sock, selectors.EVENT_READ, hs)
        self._service(hs, 0)

    def _check_source(self, source: str) -> None:
        if source and self.by_source.get(source, 0) >= self._per_peer:
            self._events(Limit("per_peer"))
            raise PeerLimitError(f"{source} already has {self._per_peer} handshakes in flight "
                                 "([agent] max_inflight_per_peer)")

    def _finish_early(self, reply: AcceptReply, sock: socket.socket, exc: TlshdError) -> None:
        if reply.message_type == MsgType.SERVERHELLO and isinstance(exc, CredentialError):
            # ktls-utils a58a360: a misconfigured server sends a fatal alert, so the client
            # fails at once instead of retrying what cannot succeed until its mount times out.
            with contextlib.suppress(OSError):
                sock.send(ACCESS_DENIED_ALERT, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        self._report(reply, exc.status, 0.0, f"refused: {exc}", addr=_peer_address(sock))
        self._release(sock, exc.status, (), None)
        self.failed += 1

    def _service(self, hs: Handshake, events: int) -> None:
        outer = hs.pass_begun  # a PSK retry serves the new engine inside the old pass
        if not outer:
            hs.pass_begun = time.thread_time()
        try:
            self._serve_events(hs, events)
        finally:
            if not outer:
                hs.busy_s += time.thread_time() - hs.pass_begun
                hs.pass_begun = 0.0

    def _serve_events(self, hs: Handshake, events: int) -> None:
        try:
            if hs.after is not None:
                self._absorb(hs)
                return
            if events & selectors.EVENT_WRITE:
                self._flush(hs)
            if events & selectors.EVENT_READ:
                self._read(hs)
            self._pump(hs)
        except TlshdError as exc:  # an expected failure: the request's log line says it
            self._end(hs, exc)
        except Exception as exc:  # a bug: one handshake must never kill the loop
            log.exception("handshake crashed")
            self._end(hs, _internal(exc))

    def _read(self, hs: Handshake) -> None:
        event = hs.engine.next_event()
        if not isinstance(event, NeedData):
            return
        try:
            data = hs.sock.recv(event.max_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise PeerClosedError(f"connection error: {exc.strerror}") from None
        if self._debug_io:  # sizes only: the bytes may be encrypted handshake messages
            io_log.debug("fd=%d read %d of %d wanted bytes", hs.sock.fileno(), len(data),
                      event.max_bytes)
        hs.engine.receive_data(data)

    def _pump(self, hs: Handshake) -> None:
        asked = hs.engine.next_event()
        if isinstance(asked, NeedServerCredentials):
            self._chooser.answer(hs.engine, hs.reply, asked, hs.psk)
        hs.out += hs.engine.data_to_send()
        self._flush(hs)
        event = hs.engine.next_event()
        if isinstance(event, HandshakeComplete):
            self._complete(hs, event.session)
        elif isinstance(event, HandshakeFailed):
            self._end(hs, event.error)
        else:
            self._sel.modify(hs.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if hs.out
                                                               else 0), hs)

    def _flush(self, hs: Handshake) -> None:
        while hs.out:
            try:
                sent = hs.sock.send(hs.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise PeerClosedError(f"send failed: {exc.strerror}") from None
            del hs.out[:sent]

    def _complete(self, hs: Handshake, session: SessionResult) -> None:
        if hs.out:  # our final flight must reach the peer before the kernel takes over
            self._send_final_flight(hs)
        if is_app_request(hs.reply) and hs.role == "client":
            self._await_tickets(hs, session)
            return
        self._install(hs, session)

    def _await_tickets(self, hs: Handshake, session: SessionResult) -> None:
        now = self._clock()
        wait = min(POST_WAIT_S[1], max(POST_WAIT_S[0], 2 * (now - hs.started)))
        hs.after = PostHandshake(session, now + wait, wait, now + POST_WAIT_S[1],
                                 bytearray(hs.engine.trailing_data))
        hs.sock.setblocking(False)
        self._sel.modify(hs.sock, selectors.EVENT_READ, hs)
        self._absorb(hs)

    def _absorb(self, hs: Handshake) -> None:
        """The records after an application's client handshake (PostHandshake)."""
        after = hs.after
        assert after is not None
        while True:
            need = _record_need(after.buf)
            if need == 0:
                record = bytes(after.buf)
                after.buf.clear()
                after.data = hs.engine.absorb_post_handshake(record)
                after.records += 1
                if after.data:  # the server speaks first: the rest is kTLS's
                    self._install(hs, after.session, after.records, after.data)
                    return
                # more may follow, and they follow at once: a server writes its tickets
                # together, and Nagle holds a second one for one ACK of the first at most
                after.until = min(after.last, self._clock() + _quiet_after_record(hs.sock))
                continue
            try:
                chunk = hs.sock.recv(need)
            except (BlockingIOError, InterruptedError):
                # ACK at once: a server's second ticket waits for the first one's ACK (Nagle),
                # and a delayed ACK would hold it 40 ms
                with contextlib.suppress(OSError):
                    hs.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                return
            except OSError as exc:
                raise PeerClosedError(f"connection error: {exc.strerror}") from None
            if not chunk:  # closed after the handshake: the application reads EOF
                self._install(hs, after.session, after.records)
                return
            after.buf += chunk

    def _settle(self, hs: Handshake) -> None:
        """The wait after an application's client handshake is over: kTLS from here."""
        assert hs.after is not None
        try:
            self._install(hs, hs.after.session, hs.after.records)
        except TlshdError as exc:
            self._end(hs, exc)

    def _install(self, hs: Handshake, session: SessionResult, records: int = 0,
                 data: bytes = b"") -> None:
        suite = suite_from_openssl_name(session.cipher_name)
        params = ktls_params_from_secrets(suite, session.tx_secret, session.rx_secret,
                                          session.tx_seq, session.rx_seq + records)
        install_ktls(self.upcall, hs.sock.fileno(), params)
        # PSK: the key's serial (the NVMe host looks it up); x509: the peer certificate's key
        peer = hs.psk.psk.serial if hs.psk.psk else self._peer_identity(session)
        tags = self._session_tags(hs.reply, session)
        shown = f" tags={','.join(tags)}" if tags else ""
        absorbed = f" post_handshake_records={records}" if records else ""
        subject = _subject_text(session.peer_certificate_der)
        self._finish(hs, 0, (peer,) if peer else (),
                     f"ok cipher={suite.openssl_name}{_subject(subject)}"
                     f"{shown}{absorbed}", cipher=suite.openssl_name, tags=tags,
                     peer_subject=(subject or "")[:500], data=data)
        self.completed += 1

    def _session_tags(self, reply: AcceptReply, session: SessionResult) -> tuple[str, ...]:
        """ktls-utils 1.4.0 (src/tlshd/server.c) matches tags in the x509 server handshake
        only: never as client, never with PSK."""
        if (self._tags is None or reply.message_type != MsgType.SERVERHELLO
                or reply.auth_mode != AuthMode.X509):
            return ()
        return self._tags.assign(session.peer_certificate_der)

    def _send_final_flight(self, hs: Handshake) -> None:
        hs.sock.settimeout(max(0.1, hs.deadline - self._clock()))
        try:
            hs.sock.sendall(hs.out)
        except TimeoutError:
            raise HandshakeTimeoutError("timed out sending the final flight") from None
        except OSError as exc:
            raise PeerClosedError(f"sending the final flight: {exc.strerror}") from None
        hs.out.clear()

    def _end(self, hs: Handshake, error: BaseException) -> None:
        hs.out += hs.engine.data_to_send()
        with contextlib.suppress(OSError):
            hs.sock.send(hs.out)  # the alert, best effort
        if self._retry_psk(hs, error):
            return
        first = hs.psk.first_error
        if first is not None and isinstance(error, PeerClosedError):
            error = first  # the retry found the connection closed: the refusal is the news
        status = error.status if isinstance(error, TlshdError) else errno.EIO
        self._finish(hs, status, (), f"failed: {error}")
        self.failed += 1

    def _retry_psk(self, hs: Handshake, error: BaseException) -> bool:
        """ktls-utils (src/tlshd/client.c, tlshd_tls13_client_psk_handshake) sends a new
        ClientHello with each of the kernel's keys in turn while the server refuses them
        (GnuTLS offers one identity per hello, and so does OpenSSL's callback). Here too,
        on the same connection and within the request's deadline, but only while the server
        keeps the connection open: a retry on a closed one would turn its refusal into a
        dropped connection (ETIMEDOUT)."""
        if (not hs.psk.untried or self.draining or not isinstance(error, RemoteError)
                or isinstance(error, PeerClosedError) or not _discard_stale(hs.sock)):
            return False
        refused = hs.psk.psk
        tls_s = hs.engine.tls_seconds
        engine = self._chooser.retry(hs.reply, hs.psk,
                                     error if isinstance(error, TlshdError) else None)
        if engine is None or hs.psk.psk is None:
            return False
        log.info("PSK %s refused by the server (%s); trying key %d",
                 refused.serial if refused else "-", error, hs.psk.psk.serial)
        hs.tls_s += tls_s
        hs.engine = engine
        hs.out.clear()
        self._service(hs, 0)
        return True

    def _finish(self, hs: Handshake, status: int, remote: tuple[int, ...], what: str, *,
                cipher: str = "-", tags: tuple[str, ...] = (), peer_subject: str = "",
                data: bytes = b"") -> None:
        self.inflight.pop(hs.sock.fileno(), None)
        if hs.source:
            left = self.by_source.get(hs.source, 1) - 1
            if left > 0:
                self.by_source[hs.source] = left
            else:
                self.by_source.pop(hs.source, None)
        self._sel.unregister(hs.sock)
        with contextlib.suppress(OSError):
            fcntl.fcntl(hs.sock.fileno(), fcntl.F_SETFL, hs.file_flags)
            hs.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, hs.nodelay)
        tls_ms = (hs.tls_s + hs.engine.tls_seconds) * 1000
        elapsed_ms = (self._clock() - hs.started) * 1000
        # the line before DONE (whoever sees DONE may read the log at once): busy= so far
        line = (f"{what}{hs.psk.describe()} busy={self._busy(hs) * 1000:.2f}ms "
                f"tls={tls_ms:.2f}ms")
        self._log_line(hs.reply, status, elapsed_ms, line, addr=hs.addr)
        self._release(hs.sock, status, remote, hs.reply, tags,
                      (peer_subject, cipher if status == 0 else "", data))
        # the event after it, so that its CPU figure covers the whole request, DONE included
        self._done_event(hs.reply, status, elapsed_ms, line, tls_ms, cipher,
                         cpu_ms=self._busy(hs) * 1000, tags=tags)

    @staticmethod
    def _busy(hs: Handshake) -> float:
        return hs.busy_s + (time.thread_time() - hs.pass_begun if hs.pass_begun else 0.0)

    def _release(self, sock: socket.socket, status: int, remote: tuple[int, ...],
                 reply: AcceptReply | None, tags: tuple[str, ...] = (),
                 detail: tuple[str, str, bytes] = ("", "", b"")) -> None:
        """DONE, then close our copy of the fd: now, or after ``delay_done``. ``detail``:
        the verified peer's subject, the cipher and the data read before the hand-over, for
        an application's answer."""
        if self._delay_done_s > 0:
            self._held.append((self._clock() + self._delay_done_s, sock, status, remote, reply,
                               tags, detail))
            return
        self._done(sock.fileno(), status, remote, tags, detail)
        sock.close()
        if reply is not None:
            self._keys.release(reply)

    def _send_held(self, now: float) -> None:
        while self._held and self._held[0][0] <= now:
            _, sock, status, remote, reply, tags, detail = self._held.pop(0)
            self._done(sock.fileno(), status, remote, tags, detail)
            sock.close()
            if reply is not None:
                self._keys.release(reply)

    def _report(self, reply: AcceptReply, status: int, elapsed_ms: float, what: str,
                tls_ms: float = 0.0, cipher: str = "-", *, addr: str = "-") -> None:
        """One log line and one ``done`` event per request (no key material in either)."""
        self._log_line(reply, status, elapsed_ms, what, addr=addr)
        self._done_event(reply, status, elapsed_ms, what, tls_ms, cipher)

    def _log_line(self, reply: AcceptReply, status: int, elapsed_ms: float, what: str, *,
                  addr: str) -> None:
        if (status == 0 and self._log_success) or (
                status and self._failures.allow(source_of(addr), self._clock())):
            _log_result(reply, status, elapsed_ms, what, self.netns, addr)
        # ktls-utils src/tlshd/log.c, tlshd_log_completion: only with [debug] loglevel set
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Handshake with '%s' (%s) %s", reply.peername or addr, addr,
                      "failed" if status else "succeeded")

    def _done_event(self, reply: AcceptReply, status: int, elapsed_ms: float, what: str,
                    tls_ms: float, cipher: str, *, cpu_ms: float = 0.0,
                    tags: tuple[str, ...] = ()) -> None:
        self._events(Done(role=_role(reply), auth=_auth_name(reply),
                          peer=reply.peername or "-", cipher=cipher, status=status,
                          ms=round(elapsed_ms, 3), what=what[:300], netns=self.netns,
                          tls_ms=round(tls_ms, 3), cpu_ms=round(cpu_ms, 3), tags=tags))

    def _done(self, fd: int, status: int, remote: tuple[int, ...],
              tags: tuple[str, ...] = (), detail: tuple[str, str, bytes] = ("", "", b"")
              ) -> None:
        try:
            self.upcall.done(fd, status, remote, tags, peer=detail[0], cipher=detail[1],
                             data=detail[2])
        except TlshdError as exc:  # a lost channel also shows on the READY socket: we exit there
            log.error("DONE for fd %d failed: %s", fd, exc)

    def _expire(self) -> None:
        now = self._clock()
        for hs in [h for h in self.inflight.values() if h.after is not None
                   and h.after.until <= now and not h.after.buf and h.deadline > now]:
            self._settle(hs)
        for hs in [h for h in self.inflight.values() if h.deadline <= now]:
            self._end(hs, HandshakeTimeoutError("the request's time budget ran out"))
        for hs in [h for h in self.inflight.values() if _silent(h, now)]:
            self._events(Limit("first_flight"))
            self._end(hs, HandshakeTimeoutError(
                f"no ClientHello within {self._first_flight_s * 1000:.0f} ms "
                "([agent] first_flight_timeout_ms)"))

    def serve(self, stop: Callable[[], bool], grace_s: float) -> None:
        """Run until ``stop()``, then drain. If the worker cannot go on (an ACCEPT no retry
        can cure, a lost channel), it still drains first: the handshakes it holds finish or
        get their DONE before the error ends the process."""
        try:
            while not stop():
                self.run_once()
        except TlshdError as exc:
            if self.inflight:
                log.error("worker stops: %s; finishing %d handshake(s) in flight", exc,
                          len(self.inflight))
            self.drain(grace_s)
            raise
        self.drain(grace_s)

    # --- shutdown ----------------------------------------------------------------------

    def drain(self, grace_s: float) -> None:
        """Stop accepting; let in-flight handshakes finish within ``grace_s``; then fail them."""
        self.draining = True
        until = self._clock() + grace_s
        while self.inflight and self._clock() < until:
            self.run_once(max_wait=min(0.1, until - self._clock()))
        for hs in list(self.inflight.values()):
            self._end(hs, HandshakeTimeoutError("agent shutting down"))
        self._send_held(float("inf"))
        self._flush_events()

    def close(self) -> None:
        self._send_held(float("inf"))
        self._flush_events()
        self._sel.close()
        self.upcall.close()
