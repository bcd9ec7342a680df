"""tlshd.agent.worker with a fake upcall and real TLS peers over loopback TCP.

``FakeUpcall`` implements the ``tlshd.upcall.Upcall`` port: it hands out queued
ACCEPT replies, records DONE and setsockopt calls, and wakes the worker through
a socketpair. Each request's socket is one end of a real loopback TCP pair
(the worker gets an ``os.dup`` of it, as ACCEPT would install one); a
pyOpenSSL peer runs the other end in a thread. Since setsockopt is fake, the
tests play kTLS themselves: they open the records the peer sent after the
handshake with the RX crypto_info the worker installed, and seal one with the
TX crypto_info for the peer to read, proving the keys and sequence numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from OpenSSL import SSL

from tests.pki import PKI, write_pki
from tlshd.agent.worker import Worker
from tlshd.config import load_config
from tlshd.credentials.contexts import Contexts
from tlshd.errors import DecodeError, NetlinkError
from tlshd.handshake import _openssl
from tlshd.handshake.events import SessionResult
from tlshd.ktls import SOL_TCP, SOL_TLS, TCP_ULP, TLS_RX, TLS_TX
from tlshd.netlink.messages import AcceptReply, Header
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.upcall import BrokenAcceptError

WAIT_S = 10.0
TLS_1_3 = 0x0304
AES_GCM_128, AES_GCM_256, AES_CCM_128, CHACHA20_POLY1305 = 51, 52, 53, 54
# (cipher type, crypto_info size) from linux/tls.h, checked in test_ktls.py.
SUITES = {
    "TLS_AES_128_GCM_SHA256": (AES_GCM_128, 40),
    "TLS_AES_256_GCM_SHA384": (AES_GCM_256, 56),
    "TLS_CHACHA20_POLY1305_SHA256": (CHACHA20_POLY1305, 56),
    "TLS_AES_128_CCM_SHA256": (AES_CCM_128, 40),
}
PEER_SERIAL = 4242
T = TypeVar("T")


# --- the fake port -------------------------------------------------------------------------------


@dataclass
class DoneCall:
    fd: int
    status: int
    remote_auth: tuple[int, ...]
    fd_open: bool  # the fd must still be open when DONE is sent (the kernel resolves it)
    file_flags: int | None  # F_GETFL of the shared open file at DONE time
    at: float


@dataclass
class FakeUpcall:
    queue: deque[AcceptReply | BrokenAcceptError | NetlinkError] = field(default_factory=deque)
    dones: list[DoneCall] = field(default_factory=list)
    sockopts: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    sockopt_errno: int | None = None
    accept_calls: int = 0
    drained: int = 0

    def __post_init__(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    def ready(self, *replies: AcceptReply | BrokenAcceptError | NetlinkError) -> None:
        """Queue requests and multicast a READY."""
        self.queue.extend(replies)
        self._wake_w.send(b"R")

    def notify_fileno(self) -> int:
        return self._wake_r.fileno()

    def drain_notifications(self) -> int:
        count = 0
        while True:
            try:
                count += len(self._wake_r.recv(4096))
            except BlockingIOError:
                self.drained += count
                return count

    def accept(self) -> AcceptReply | None:
        self.accept_calls += 1
        if not self.queue:
            return None
        item = self.queue.popleft()
        if isinstance(item, (BrokenAcceptError, NetlinkError)):
            raise item
        return item

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        try:
            flags: int | None = fcntl.fcntl(sockfd, fcntl.F_GETFL)
        except OSError:
            flags = None
        self.dones.append(DoneCall(sockfd, status, tuple(remote_auth), flags is not None, flags,
                                   time.monotonic()))

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        self.sockopts.append((fd, level, optname, bytes(value)))
        if self.sockopt_errno is not None:
            raise OSError(self.sockopt_errno, os.strerror(self.sockopt_errno))

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


# --- a real TLS peer -----------------------------------------------------------------------------


class Peer(threading.Thread):
    """A pyOpenSSL endpoint on a non-blocking socket, bounded by a deadline.

    Handshakes, then sends ``say`` (as application data) and reads ``expect``
    bytes of application data.
    """

    def __init__(self, ctx: SSL.Context, sock: socket.socket, *, server: bool,
                 say: bytes = b"", expect: int = 0) -> None:
        super().__init__(daemon=True)
        sock.setblocking(False)
        self.sock, self.say, self.expect = sock, say, expect
        self.conn = SSL.Connection(ctx, sock)
        if server:
            self.conn.set_accept_state()
        else:
            self.conn.set_tlsext_host_name(b"localhost")
            self.conn.set_connect_state()
        self.cipher: str | None = None
        self.received = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + WAIT_S
        try:
            self._io(self.conn.do_handshake, deadline)
            self.cipher = self.conn.get_cipher_name()
            if self.say:
                self._io(lambda: self.conn.send(self.say), deadline)
            while len(self.received) < self.expect:
                self.received += self._io(lambda: self.conn.recv(4096), deadline)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _io(self, op: Callable[[], T], deadline: float) -> T:
        while True:
            try:
                return op()
            except SSL.WantReadError:
                self._wait(deadline, write=False)
            except SSL.WantWriteError:
                self._wait(deadline, write=True)

    def _wait(self, deadline: float, *, write: bool) -> None:
        left = deadline - time.monotonic()
        r, w, _ = select.select([] if write else [self.sock], [self.sock] if write else [], [],
                                max(0.0, left))
        if not (r or w):
            raise TimeoutError("peer: no progress before the deadline")

    def finish(self) -> None:
        self.join(WAIT_S)
        assert not self.is_alive(), "peer thread did not finish"
        if self.error is not None:
            raise AssertionError(f"peer failed: {self.error!r}")


def server_peer_context(pki: PKI, suite: str | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_file(str(pki.server.cert))
    ctx.use_privatekey_file(str(pki.server.key))
    if suite:
        _openssl.set_tls13_ciphersuites(ctx, suite.encode())
    return ctx


def client_peer_context(pki: PKI, suite: str | None = None, cert: bool = True) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(pki.ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    if cert:
        ctx.use_certificate_file(str(pki.client.cert))
        ctx.use_privatekey_file(str(pki.client.key))
    if suite:
        _openssl.set_tls13_ciphersuites(ctx, suite.encode())
    return ctx


# --- playing kTLS with the installed crypto_info (AES-128-GCM) -----------------------------------


def _aead(crypto_info: bytes) -> tuple[AESGCM, bytes]:
    version, cipher = struct.unpack_from("=HH", crypto_info)
    assert (version, cipher) == (TLS_1_3, AES_GCM_128)
    iv, key, salt = crypto_info[4:12], crypto_info[12:28], crypto_info[28:32]
    return AESGCM(key), salt + iv


def _nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


def open_record(crypto_info: bytes, record: bytes, seq: int) -> tuple[int, bytes]:
    """(inner content type, content) of a TLS 1.3 record (RFC 8446 section 5.2)."""
    aead, iv = _aead(crypto_info)
    inner = aead.decrypt(_nonce(iv, seq), record[5:], record[:5]).rstrip(b"\0")
    return inner[-1], inner[:-1]


def seal_record(crypto_info: bytes, content: bytes, seq: int) -> bytes:
    aead, iv = _aead(crypto_info)
    header = struct.pack("!BHH", 23, 0x0303, len(content) + 1 + 16)
    return header + aead.encrypt(_nonce(iv, seq), content + b"\x17", header)


def read_record(sock: socket.socket) -> bytes:
    header = _read_exact(sock, 5)
    return header + _read_exact(sock, int.from_bytes(header[3:5], "big"))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed mid-record"
        data += chunk
    return data


def read_app_data(sock: socket.socket, rx_info: bytes) -> tuple[bytes, int]:
    """The first application data after the handshake, and how many records preceded it."""
    sock.settimeout(WAIT_S)
    for seq in range(8):
        kind, content = open_record(rx_info, read_record(sock), seq)
        if kind == 23:
            return content, seq
    raise AssertionError("no application data in the first 8 records")


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def contexts(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Contexts:
    path = tmp_path_factory.mktemp("cfg") / "tlshd.conf"
    path.write_text(
        "[authenticate.client]\n"
        f"x509.truststore={pki.ca}\n\n"
        "[authenticate.server]\n"
        f"x509.truststore={pki.ca}\n"
        f"x509.certificate={pki.server.cert}\n"
        f"x509.private_key={pki.server.key}\n"
    )
    return Contexts.from_config(load_config(path))


@dataclass
class Request:
    """One request: ``mine`` is the consumer's end (the kernel's socket), ``peer`` the peer's."""

    mine: socket.socket
    peer: socket.socket
    reply: AcceptReply
    threads: list[Peer] = field(default_factory=list)

    def start_peer(self, ctx: SSL.Context, *, server: bool, say: bytes = b"",
                   expect: int = 0) -> Peer:
        peer = Peer(ctx, self.peer, server=server, say=say, expect=expect)
        self.threads.append(peer)
        peer.start()
        return peer

    def close(self) -> None:
        """Wake and join the peer thread before closing: its fd number must not be reused
        under it."""
        for sock in (self.mine, self.peer):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(WAIT_S)
        self.mine.close()
        self.peer.close()


@pytest.fixture
def requests() -> Iterator[Callable[..., Request]]:
    made: list[Request] = []

    def make(message_type: MsgType = MsgType.CLIENTHELLO, auth_mode: AuthMode = AuthMode.UNAUTH,
             timeout_ms: int | None = None, blocking: bool = True) -> Request:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            mine = socket.create_connection(listener.getsockname(), timeout=WAIT_S)
            peer, _ = listener.accept()
        mine.setblocking(blocking)
        reply = AcceptReply(
            header=Header(type=0x22, flags=0, seq=len(made) + 1, pid=0),
            sockfd=os.dup(mine.fileno()), message_type=message_type, auth_mode=auth_mode,
            peername="localhost", timeout_ms=timeout_ms, keyring=None, peer_identities=(),
            certificate=None, unknown_attrs=(),
        )
        made.append(Request(mine, peer, reply))
        return made[-1]

    yield make
    for req in made:
        req.close()


@dataclass
class Rig:
    upcall: FakeUpcall
    worker: Worker
    sessions: list[SessionResult]

    def run_until(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "worker made no progress before the deadline"
            self.worker.run_once(max_wait=0.05)

    def run_until_done(self, count: int = 1, timeout: float = WAIT_S) -> None:
        self.run_until(lambda: len(self.upcall.dones) >= count, timeout)


@pytest.fixture
def rig_factory(contexts: Contexts) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(*, ctx: Callable[[AcceptReply], object] = contexts,
             identity: Callable[[SessionResult], int] | None = None, **worker_kw: object) -> Rig:
        upcall, sessions = FakeUpcall(), []

        def record_identity(session: SessionResult) -> int:
            sessions.append(session)
            return PEER_SERIAL if session.peer_certificate_der else 0

        worker = Worker(upcall, ctx, peer_identity=identity or record_identity,
                        **worker_kw)  # type: ignore[arg-type]
        made.append(Rig(upcall, worker, sessions))
        return made[-1]

    yield make
    for rig in made:
        rig.worker.drain(grace_s=0)  # ends (and closes) whatever a test left in flight
        rig.worker.close()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as caught:
        os.fstat(fd)
    assert caught.value.errno == errno.EBADF


def nothing_to_read(sock: socket.socket, wait_s: float = 0.1) -> bool:
    return not select.select([sock], [], [], wait_s)[0]


# --- success -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(SUITES))
def test_client_success_installs_ulp_tx_rx_then_done_zero_and_closes_fd(
    rig: Rig, requests: Callable[..., Request], pki: PKI, suite: str
) -> None:
    req = requests()
    peer = req.start_peer(server_peer_context(pki, suite), server=True)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.finish()

    cipher_type, size = SUITES[suite]
    fd = req.reply.sockfd
    assert [(f, level, name) for f, level, name, _ in rig.upcall.sockopts] == [
        (fd, SOL_TCP, TCP_ULP), (fd, SOL_TLS, TLS_TX), (fd, SOL_TLS, TLS_RX)]
    assert rig.upcall.sockopts[0][3] == b"tls\0"
    for _, _, _, info in rig.upcall.sockopts[1:]:
        assert len(info) == size
        assert struct.unpack_from("=HH", info) == (TLS_1_3, cipher_type)
    assert peer.cipher == suite
    [done] = rig.upcall.dones
    assert (done.fd, done.status, done.fd_open) == (fd, 0, True)
    assert_closed(fd)
    assert (rig.worker.completed, rig.worker.failed, rig.worker.inflight) == (1, 0, {})


def test_client_reports_the_verified_server_certificate_as_remote_auth(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests()
    peer = req.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.finish()

    assert rig.upcall.dones[0].remote_auth == (PEER_SERIAL,)
    [session] = rig.sessions
    assert session.peer_certificate_der == pki.server.cert_der


def test_client_installed_keys_carry_records_both_ways(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests()
    peer = req.start_peer(server_peer_context(pki, "TLS_AES_128_GCM_SHA256"), server=True,
                say=b"hello from the server", expect=len(b"ping from the kernel"))
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    _, _, _, tx_info = rig.upcall.sockopts[1]
    _, _, _, rx_info = rig.upcall.sockopts[2]
    # Whatever the server sent after its Finished (tickets, data) is still in the socket.
    content, _tickets_before = read_app_data(req.mine, rx_info)
    assert content == b"hello from the server"
    req.mine.sendall(seal_record(tx_info, b"ping from the kernel", 0))
    peer.finish()
    assert peer.received == b"ping from the kernel"


def test_server_success_with_client_certificate(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    peer = req.start_peer(client_peer_context(pki, "TLS_AES_128_GCM_SHA256"), server=False,
                say=b"hello from the client", expect=len(b"reply from the kernel"))
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    [done] = rig.upcall.dones
    assert (done.status, done.remote_auth) == (0, (PEER_SERIAL,))
    assert rig.sessions[0].peer_certificate_der == pki.client.cert_der
    _, _, _, tx_info = rig.upcall.sockopts[1]
    _, _, _, rx_info = rig.upcall.sockopts[2]
    content, earlier = read_app_data(req.mine, rx_info)
    assert (content, earlier) == (b"hello from the client", 0)
    # The server's NewSessionTickets were withheld, so the kernel starts TX at seq 0.
    req.mine.sendall(seal_record(tx_info, b"reply from the kernel", 0))
    peer.finish()
    assert peer.received == b"reply from the kernel"
    assert_closed(req.reply.sockfd)


def test_server_without_client_certificate_reports_no_remote_auth(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    peer = req.start_peer(client_peer_context(pki, cert=False), server=False)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.finish()

    [done] = rig.upcall.dones
    assert (done.status, done.remote_auth) == (0, ())


# --- refusals and failures -----------------------------------------------------------------------


def test_setsockopt_enoent_becomes_the_done_status(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    rig.upcall.sockopt_errno = errno.ENOENT
    req = requests()
    peer = req.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.finish()

    assert [name for _, _, name, _ in rig.upcall.sockopts] == [TCP_ULP]
    [done] = rig.upcall.dones
    assert (done.status, done.fd_open, done.remote_auth) == (errno.ENOENT, True, ())
    assert_closed(req.reply.sockfd)
    assert (rig.worker.completed, rig.worker.failed) == (0, 1)


@pytest.mark.parametrize(
    ("message_type", "auth_mode"),
    [
        (MsgType.CLIENTHELLO, AuthMode.PSK),  # a PSK client request without peer identities
        (MsgType.CLIENTHELLO, AuthMode.UNSPEC),
        (MsgType.UNSPEC, AuthMode.UNAUTH),
        (MsgType.UNSPEC, AuthMode.X509),
    ],
)
def test_unsupported_request_is_refused_with_einval_without_touching_the_socket(
    rig: Rig, requests: Callable[..., Request], message_type: MsgType, auth_mode: AuthMode
) -> None:
    req = requests(message_type, auth_mode)
    flags = fcntl.fcntl(req.mine.fileno(), fcntl.F_GETFL)
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    [done] = rig.upcall.dones
    assert (done.fd, done.status, done.fd_open) == (req.reply.sockfd, errno.EINVAL, True)
    assert rig.upcall.sockopts == []
    assert done.file_flags == flags
    assert nothing_to_read(req.peer)
    assert_closed(req.reply.sockfd)
    assert rig.worker.failed == 1


def test_peer_speaking_garbage_ends_with_eacces(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    req.peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.EACCES
    assert rig.upcall.sockopts == []
    assert_closed(req.reply.sockfd)


def test_peer_closing_mid_handshake_ends_with_etimedout(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    # ktls-utils src/tlshd/handshake.c: GNUTLS_E_PREMATURE_TERMINATION -> ETIMEDOUT
    # ("Ask the kernel to retry", commit b010190)
    req = requests()
    req.peer.close()
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.ETIMEDOUT
    assert_closed(req.reply.sockfd)


def test_untrusted_server_certificate_ends_with_eacces_and_an_alert(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests()
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_file(str(pki.untrusted_server.cert))
    ctx.use_privatekey_file(str(pki.untrusted_server.key))
    peer = req.start_peer(ctx, server=True)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.join(WAIT_S)

    assert rig.upcall.dones[0].status == errno.EACCES
    assert isinstance(peer.error, SSL.Error)  # it got our alert
    assert rig.upcall.sockopts == []


def test_accepted_fd_that_is_not_a_socket_gets_ebadf(
    rig: Rig, requests: Callable[..., Request], tmp_path: Path
) -> None:
    req = requests()
    os.close(req.reply.sockfd)
    not_a_socket = os.open(tmp_path, os.O_RDONLY)
    rig.upcall.ready(replace(req.reply, sockfd=not_a_socket))

    try:
        rig.run_until_done()
    finally:
        with contextlib.suppress(OSError):
            os.close(not_a_socket)  # in case the worker did not

    assert (rig.upcall.dones[0].fd, rig.upcall.dones[0].status) == (not_a_socket, errno.EBADF)
    assert rig.worker.inflight == {}


def test_accepted_fd_that_is_not_a_socket_is_closed(
    rig: Rig, requests: Callable[..., Request], tmp_path: Path
) -> None:
    req = requests()
    os.close(req.reply.sockfd)
    not_a_socket = os.open(tmp_path, os.O_RDONLY)
    rig.upcall.ready(replace(req.reply, sockfd=not_a_socket))

    try:
        rig.run_until_done()
        assert_closed(not_a_socket)
    finally:
        with contextlib.suppress(OSError):
            os.close(not_a_socket)


# --- time budgets --------------------------------------------------------------------------------


def test_accept_timeout_is_honoured_for_a_silent_peer(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    rig = rig_factory(default_timeout_ms=10_000)
    req = requests(timeout_ms=300)
    started = time.monotonic()
    rig.upcall.ready(req.reply)

    rig.run_until_done(timeout=5)

    [done] = rig.upcall.dones
    assert done.status == errno.ETIMEDOUT
    assert 0.28 <= done.at - started < 1.5
    assert_closed(req.reply.sockfd)


def test_accept_timeout_longer_than_the_default_wins(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    rig = rig_factory(default_timeout_ms=100)
    req = requests(timeout_ms=600)
    started = time.monotonic()
    rig.upcall.ready(req.reply)

    rig.run_until_done(timeout=5)

    assert rig.upcall.dones[0].status == errno.ETIMEDOUT
    assert 0.58 <= rig.upcall.dones[0].at - started < 2.0


def test_configured_default_applies_without_an_accept_timeout(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    rig = rig_factory(default_timeout_ms=300)
    req = requests(timeout_ms=None)
    started = time.monotonic()
    rig.upcall.ready(req.reply)

    rig.run_until_done(timeout=5)

    [done] = rig.upcall.dones
    assert done.status == errno.ETIMEDOUT
    assert 0.28 <= done.at - started < 1.5


def test_drain_fails_in_flight_handshakes_with_etimedout_after_the_grace_period(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    first, second = requests(), requests(MsgType.SERVERHELLO, AuthMode.X509)
    rig.upcall.ready(first.reply, second.reply)
    rig.worker.run_once(max_wait=0.05)
    assert len(rig.worker.inflight) == 2
    started = time.monotonic()

    rig.worker.drain(grace_s=0.3)

    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed < 1.5
    assert [d.status for d in rig.upcall.dones] == [errno.ETIMEDOUT, errno.ETIMEDOUT]
    assert rig.worker.inflight == {}
    assert_closed(first.reply.sockfd)
    assert_closed(second.reply.sockfd)


def test_drain_lets_a_handshake_finish_within_the_grace_period(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    req = requests()
    rig.upcall.ready(req.reply)
    rig.worker.run_once(max_wait=0.05)  # ClientHello sent, now in flight
    peer = req.start_peer(server_peer_context(pki), server=True)

    rig.worker.drain(grace_s=WAIT_S)
    peer.finish()

    assert [d.status for d in rig.upcall.dones] == [0]


def test_draining_worker_reads_ready_but_accepts_nothing_new(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    inflight = requests()
    rig.upcall.ready(inflight.reply)
    rig.worker.run_once(max_wait=0.05)
    calls = rig.upcall.accept_calls
    late = requests(auth_mode=AuthMode.PSK)
    rig.upcall.ready(late.reply)

    rig.worker.drain(grace_s=0.3)

    os.close(late.reply.sockfd)
    assert rig.upcall.accept_calls == calls
    assert rig.upcall.drained == 2
    assert list(rig.upcall.queue) == [late.reply]
    assert [(d.fd, d.status) for d in rig.upcall.dones] == [
        (inflight.reply.sockfd, errno.ETIMEDOUT)]


# --- the shared file's flags ---------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False])
def test_file_flags_are_restored_before_done_on_success(
    rig: Rig, requests: Callable[..., Request], pki: PKI, blocking: bool
) -> None:
    req = requests(blocking=blocking)
    flags = fcntl.fcntl(req.mine.fileno(), fcntl.F_GETFL)
    peer = req.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(req.reply)

    rig.run_until_done()
    peer.finish()

    [done] = rig.upcall.dones
    assert done.status == 0
    assert done.file_flags == flags
    assert bool(flags & os.O_NONBLOCK) is not blocking
    assert fcntl.fcntl(req.mine.fileno(), fcntl.F_GETFL) == flags


@pytest.mark.parametrize("blocking", [True, False])
def test_file_flags_are_restored_before_done_on_timeout(
    rig: Rig, requests: Callable[..., Request], blocking: bool
) -> None:
    req = requests(timeout_ms=100, blocking=blocking)
    flags = fcntl.fcntl(req.mine.fileno(), fcntl.F_GETFL)
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    [done] = rig.upcall.dones
    assert done.status == errno.ETIMEDOUT
    assert done.file_flags == flags
    assert fcntl.fcntl(req.mine.fileno(), fcntl.F_GETFL) == flags


# --- malformed ACCEPT replies --------------------------------------------------------------------


def test_broken_accept_with_an_fd_gets_done_with_its_status_and_the_fd_closed(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    req = requests()
    broken = BrokenAcceptError(DecodeError("attribute runs past the message"),
                               req.reply.sockfd)
    rig.upcall.ready(broken)

    rig.run_until_done()

    [done] = rig.upcall.dones
    assert (done.fd, done.status, done.fd_open) == (req.reply.sockfd, errno.EINVAL, True)
    assert_closed(req.reply.sockfd)
    assert rig.upcall.sockopts == []
    assert nothing_to_read(req.peer)


def test_broken_accept_without_an_fd_is_skipped_and_the_next_request_served(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    req = requests(auth_mode=AuthMode.PSK)
    rig.upcall.ready(BrokenAcceptError(DecodeError("no fd"), None), req.reply)

    rig.run_until_done()

    assert [(d.fd, d.status) for d in rig.upcall.dones] == [(req.reply.sockfd, errno.EINVAL)]


# --- isolation -----------------------------------------------------------------------------------


def test_exception_while_finishing_one_handshake_ends_only_that_one_with_eio(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI
) -> None:
    calls: list[SessionResult] = []

    def identity(session: SessionResult) -> int:
        calls.append(session)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 0

    rig = rig_factory(identity=identity)
    first, second = requests(), requests()
    peers = [r.start_peer(server_peer_context(pki), server=True) for r in (first, second)]
    rig.upcall.ready(first.reply, second.reply)

    rig.run_until_done(2)
    for peer in peers:
        peer.finish()

    statuses = sorted(d.status for d in rig.upcall.dones)
    assert statuses == [0, errno.EIO]
    assert_closed(first.reply.sockfd)
    assert_closed(second.reply.sockfd)
    assert rig.worker.inflight == {}


def test_exception_in_the_contexts_callable_ends_only_that_request_with_eio(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI,
    contexts: Contexts
) -> None:
    first, second = requests(), requests()

    def ctx(reply: AcceptReply) -> object:
        if reply.sockfd == first.reply.sockfd:
            raise RuntimeError("context lookup crashed")
        return contexts(reply)

    rig = rig_factory(ctx=ctx)
    peer = second.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(first.reply, second.reply)

    rig.run_until_done(2)
    peer.finish()

    assert [(d.fd, d.status) for d in rig.upcall.dones] == [
        (first.reply.sockfd, errno.EIO), (second.reply.sockfd, 0)]


def test_credential_error_from_the_contexts_callable_is_that_requests_status(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], contexts: Contexts
) -> None:
    # A server request with no server certificate configured: Contexts raises CredentialError,
    # and the client gets a fatal access_denied alert at once (ktls-utils a58a360,
    # src/tlshd/server.c: gnutls_alert_send(session, GNUTLS_AL_FATAL, GNUTLS_A_ACCESS_DENIED)).
    no_server = dataclasses.replace(contexts, server=None)
    rig = rig_factory(ctx=no_server)
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.ENOKEY
    assert_closed(req.reply.sockfd)
    req.peer.settimeout(5)
    assert req.peer.recv(100) == bytes([21, 3, 3, 0, 2, 2, 49])


def test_server_certificate_without_its_key_sends_a_fatal_alert(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI
) -> None:
    from tlshd.config import Config, X509Side

    contexts = Contexts.from_config(Config(server=X509Side(certificate=pki.server.cert)))
    assert contexts.problems() == ["[authenticate.server] x509 credentials: x509.private_key "
                                   "is not set: no usable server credentials"]
    rig = rig_factory(ctx=contexts)
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.ENOKEY
    req.peer.settimeout(5)
    assert req.peer.recv(100) == bytes([21, 3, 3, 0, 2, 2, 49])


def test_client_request_with_bad_credentials_gets_no_alert(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI, tmp_path: Path
) -> None:
    from tlshd.config import Config, X509Side

    side = X509Side(certificate=pki.client.cert, private_key=tmp_path / "missing.key")
    rig = rig_factory(ctx=Contexts.from_config(Config(client=side)))
    req = requests(MsgType.CLIENTHELLO, AuthMode.X509)
    rig.upcall.ready(req.reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.ENOKEY
    req.peer.setblocking(False)
    with contextlib.suppress(BlockingIOError):  # nothing sent: a client does not speak first
        assert req.peer.recv(100) == b""


# --- when the worker accepts ---------------------------------------------------------------------


def test_ready_makes_the_worker_accept_before_the_next_sweep(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    rig.worker.run_once(max_wait=0.05)  # the start-up sweep finds nothing
    req = requests(auth_mode=AuthMode.PSK)
    started = time.monotonic()

    rig.upcall.ready(req.reply)
    rig.run_until_done()

    assert time.monotonic() - started < 0.5
    assert rig.upcall.drained == 1


def test_sweep_accepts_a_request_whose_ready_was_lost(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    now = [100.0]
    rig = rig_factory(clock=lambda: now[0])
    rig.worker.run_once(max_wait=0.01)
    req = requests(auth_mode=AuthMode.PSK)
    rig.upcall.queue.append(req.reply)  # no READY

    rig.worker.run_once(max_wait=0.01)
    assert rig.upcall.dones == []
    now[0] += 1.0
    rig.worker.run_once(max_wait=0.01)

    assert [d.status for d in rig.upcall.dones] == [errno.EINVAL]


def test_max_inflight_caps_the_requests_accepted(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    rig = rig_factory(max_inflight=1)
    first, second = requests(), requests()
    rig.upcall.ready(first.reply, second.reply)

    rig.worker.run_once(max_wait=0.05)

    os.close(second.reply.sockfd)
    assert list(rig.worker.inflight) == [first.reply.sockfd]
    assert list(rig.upcall.queue) == [second.reply]


def test_a_full_worker_takes_the_next_queued_request_as_soon_as_one_ends(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    """Backpressure: at max_inflight the rest stay in the kernel's queue; a finished handshake
    makes room at once, with no READY and no sweep (the clock stands still)."""
    rig = rig_factory(max_inflight=1, clock=lambda: 100.0)
    first, second = requests(), requests()
    rig.upcall.ready(first.reply, second.reply)
    rig.worker.run_once(max_wait=0.05)
    assert list(rig.worker.inflight) == [first.reply.sockfd]

    first.peer.shutdown(socket.SHUT_RDWR)  # the first handshake fails (its peer went away)
    rig.run_until(lambda: second.reply.sockfd in rig.worker.inflight)

    assert [d.status for d in rig.upcall.dones] == [errno.ETIMEDOUT]  # peer closed: ETIMEDOUT
    assert list(rig.upcall.queue) == []
    assert rig.upcall.drained == 1  # the one READY, no other


def test_max_inflight_is_a_configuration_key() -> None:
    from tlshd.config import MAX_INFLIGHT_DEFAULT, parse_config

    assert parse_config("").max_inflight == MAX_INFLIGHT_DEFAULT
    assert parse_config("[agent]\nmax_inflight=3\n").max_inflight == 3


def test_an_accept_the_kernel_refuses_is_logged_and_the_worker_serves_on(
    rig: Rig, requests: Callable[..., Request], caplog: pytest.LogCaptureFixture,
) -> None:
    """An NLMSG_ERROR answer to ACCEPT such as EIO is that request's trouble: the worker logs it
    and takes the next request in the same round."""
    req = requests(auth_mode=AuthMode.PSK)
    rig.upcall.queue.extend([NetlinkError(errno.EIO, "ACCEPT"), req.reply])  # no READY

    rig.worker.run_once(max_wait=0.01)  # the start-up sweep: both in one round

    assert [d.status for d in rig.upcall.dones] == [errno.EINVAL]
    assert "ACCEPT: EIO (5); going on with the next request" in caplog.text


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL])
def test_an_accept_no_retry_can_cure_stops_the_worker(
    rig: Rig, requests: Callable[..., Request], err: int
) -> None:
    """No CAP_NET_ADMIN (EPERM) and the like: the worker raises (the supervisor logs the death
    and restarts it) instead of looking ready while every request times out."""
    rig.upcall.queue.append(NetlinkError(err, "ACCEPT"))
    with pytest.raises(NetlinkError):
        rig.worker.run_once(max_wait=0.01)


def test_delay_done_holds_each_done_while_the_worker_serves_others(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI
) -> None:
    # [debug] delay_done (ktls-utils src/tlshd/netlink.c: sleep(tlshd_delay_done) before the
    # DONE downcall); here the held request does not stop the next one from being served.
    rig = rig_factory(delay_done_s=0.5)
    first = requests()
    first.peer.close()  # fails at once: ETIMEDOUT, held for 0.5 s
    rig.upcall.ready(first.reply)
    begun = time.monotonic()
    rig.run_until(lambda: not rig.worker.inflight and rig.worker.failed == 1)
    assert rig.upcall.dones == []
    os.fstat(first.reply.sockfd)  # still open: DONE names it

    second = requests()
    peer = second.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(second.reply)
    rig.run_until_done(1)
    held = time.monotonic() - begun
    assert [d.fd for d in rig.upcall.dones] == [first.reply.sockfd]
    assert held >= 0.5
    rig.run_until_done(2)
    peer.finish()
    assert [d.status for d in rig.upcall.dones] == [errno.ETIMEDOUT, 0]
    assert_closed(first.reply.sockfd)


def test_nodelay_is_on_during_the_handshake_and_restored_before_done(
    rig: Rig, requests: Callable[..., Request]
) -> None:
    # ktls-utils src/tlshd/handshake.c: tlshd_save_nagle, then tlshd_set_nagle(session, 1)
    req = requests()
    assert req.mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    rig.upcall.ready(req.reply)
    rig.run_until(lambda: req.reply.sockfd in rig.worker.inflight)
    assert req.mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

    req.peer.close()
    rig.run_until_done()
    assert req.mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_a_socket_that_is_not_tcp_is_eopnotsupp(rig: Rig,
                                                requests: Callable[..., Request]) -> None:
    # ktls-utils src/tlshd/handshake.c: "Unsupported ip_proto" -> EOPNOTSUPP (QUIC, ...)
    req = requests()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reply = dataclasses.replace(req.reply, sockfd=os.dup(udp.fileno()))
    udp.close()
    rig.upcall.ready(reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.EOPNOTSUPP
    assert_closed(reply.sockfd)


@pytest.mark.parametrize("auth_mode", [AuthMode.UNAUTH, AuthMode.X509])
def test_a_client_request_without_a_peer_name_is_refused(
    rig: Rig, requests: Callable[..., Request], auth_mode: AuthMode
) -> None:
    # ktls-utils main, pull request #160: a client handshake request that carries no peer
    # name is rejected, not completed against a certificate nobody checked a name on
    req = requests(auth_mode=auth_mode)
    reply = dataclasses.replace(req.reply, peername=None)
    rig.upcall.ready(reply)

    rig.run_until_done()

    assert rig.upcall.dones[0].status == errno.EINVAL
    assert nothing_to_read(req.peer)  # no ClientHello went out


def test_the_log_line_names_the_peer_address_and_certificate_subject(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI,
    caplog: pytest.LogCaptureFixture
) -> None:
    rig = rig_factory()
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.use_certificate_file(str(pki.client.cert))
    client.use_privatekey_file(str(pki.client.key))
    client.load_verify_locations(str(pki.ca))
    peer = req.start_peer(client, server=False)
    host, port = req.peer.getsockname()[:2]
    with caplog.at_level(logging.DEBUG, logger="tlshd"):
        rig.upcall.ready(req.reply)
        rig.run_until_done()
    peer.finish()
    lines = [r.getMessage() for r in caplog.records]
    line = next(x for x in lines if x.startswith("handshake "))
    assert f"addr={host}:{port} status=0" in line
    assert "subject='CN=" in line  # the client certificate's subject, quoted
    # ktls-utils src/tlshd/log.c, tlshd_log_completion (at [debug] loglevel != 0)
    assert f"Handshake with 'localhost' ({host}:{port}) succeeded" in lines


def test_log_success_false_keeps_failures_only(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI,
    caplog: pytest.LogCaptureFixture
) -> None:
    rig = rig_factory(log_success=False)
    good, bad = requests(), requests()
    peer = good.start_peer(server_peer_context(pki), server=True)
    bad.peer.close()
    with caplog.at_level(logging.INFO, logger="tlshd"):
        rig.upcall.ready(good.reply, bad.reply)
        rig.run_until_done(2)
    peer.finish()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("handshake ")]
    assert len(lines) == 1 and "status=110" in lines[0]


def test_a_streamed_huge_client_hello_costs_one_record(rig: Rig, requests: Callable[...,
                                                                                   Request]
                                                       ) -> None:
    """The hostile PSK client of the hardening issue: 16 KiB records of a ClientHello that
    declares 2^24-1 bytes. The worker refuses it at the first record (illegal_parameter,
    EACCES) instead of buffering and re-parsing megabytes."""
    req = requests(MsgType.SERVERHELLO, AuthMode.PSK)
    record = bytes([22, 3, 3, 0x40, 0x00]) + b"\x01\xff\xff\xff" + b"\0" * (16384 - 4)
    sent: list[int] = [0]

    def stream() -> None:
        with contextlib.suppress(OSError):
            for _ in range(600):  # 9.8 MB, as in the report
                req.peer.sendall(record)
                sent[0] += len(record)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    rig.upcall.ready(req.reply)
    cpu = time.process_time()
    rig.run_until_done()
    cpu_ms = (time.process_time() - cpu) * 1000
    req.peer.settimeout(WAIT_S)
    alert = req.peer.recv(7)
    req.peer.shutdown(socket.SHUT_RDWR)
    thread.join(WAIT_S)
    print(f"hostile_hello_cpu_ms={cpu_ms:.1f} peer_sent_bytes={sent[0]}")
    assert rig.upcall.dones[0].status == errno.EACCES
    assert alert == bytes([21, 3, 3, 0, 2, 2, 47])  # illegal_parameter
    assert rig.upcall.sockopts == []


def _hello_offering(identities: list[bytes]) -> bytes:
    """ClientHello records (hand-built: OpenSSL will not send such identities) whose
    pre_shared_key extension offers ``identities``."""
    ids = b"".join(len(i).to_bytes(2, "big") + i + b"\0\0\0\0" for i in identities)
    binders = b"\x00\x21\x20" + b"\0" * 32
    psk_ext = len(ids).to_bytes(2, "big") + ids + binders
    extensions = (b"\x00\x2b\x00\x03\x02\x03\x04"  # supported_versions: TLS 1.3
                  + b"\x00\x29" + len(psk_ext).to_bytes(2, "big") + psk_ext)
    body = (b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(extensions).to_bytes(2, "big") + extensions)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(bytes([22, 3, 3]) + len(chunk).to_bytes(2, "big") + chunk
                    for chunk in (message[i:i + 16384] for i in range(0, len(message), 16384)))


@pytest.mark.parametrize("identities", [[b"i" * 60_000], [b"id%d" % n for n in range(1000)],
                                        [b"NVMe0R01 a b\nhandshake status=0 forged"]],
                         ids=["60000-byte identity", "1000 identities", "newline"])
def test_offered_identities_reach_the_log_escaped_and_bounded(
    rig: Rig, requests: Callable[..., Request], caplog: pytest.LogCaptureFixture,
    identities: list[bytes]
) -> None:
    req = requests(MsgType.SERVERHELLO, AuthMode.PSK)
    req.peer.sendall(_hello_offering(identities))
    rig.upcall.ready(req.reply)
    with caplog.at_level(logging.INFO, logger="tlshd"):
        rig.run_until_done()
    req.peer.settimeout(WAIT_S)
    assert req.peer.recv(7) == bytes([21, 3, 3, 0, 2, 2, 115])  # unknown_psk_identity
    assert rig.upcall.dones[0].status == errno.EKEYREJECTED
    lines = [r.getMessage() for r in caplog.records]
    longest = max(len(line) for line in lines)
    print(f"longest_log_line={longest} identities={len(identities)}")
    assert longest < 800, max(lines, key=len)[:300]
    assert all("\n" not in line for line in lines)
    assert any("no PSK key for identity" in line for line in lines)


@pytest.mark.parametrize("cn_fallback, status", [(False, errno.EACCES), (True, 0)])
def test_cn_fallback_decides_for_a_cn_only_server_certificate(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI,
    tmp_path: Path, cn_fallback: bool, status: int
) -> None:
    from tests.pki import issue_leaf, write_issued

    files = write_issued(tmp_path, "cn-only", issue_leaf(pki.ca_issued, "localhost"))
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_file(str(files.cert))
    ctx.use_privatekey_file(str(files.key))
    rig = rig_factory(cn_fallback=cn_fallback)
    req = requests()  # peer name "localhost"
    req.start_peer(ctx, server=True)
    rig.upcall.ready(req.reply)
    rig.run_until_done()
    assert rig.upcall.dones[0].status == status


def test_a_worker_that_must_stop_still_finishes_its_handshakes(
    rig: Rig, requests: Callable[..., Request], pki: PKI
) -> None:
    """ACCEPT answered with EINVAL: the worker stops, but the three handshakes it holds
    complete (or fail) with a DONE each instead of leaving their consumers to time out."""
    held = [requests() for _ in range(3)]
    rig.upcall.ready(*(req.reply for req in held))
    rig.worker.run_once(max_wait=0.01)  # all three accepted, their ClientHellos sent
    assert len(rig.worker.inflight) == 3
    for req in held:
        req.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(NetlinkError(errno.EINVAL, "ACCEPT"))
    with pytest.raises(NetlinkError):
        rig.worker.serve(lambda: False, grace_s=WAIT_S)
    assert sorted(done.fd for done in rig.upcall.dones) == sorted(r.reply.sockfd for r in held)
    assert [done.status for done in rig.upcall.dones] == [0, 0, 0]
    assert rig.worker.inflight == {}


# --- a peer that holds a slot for nothing (slot exhaustion) ------------------------------


@pytest.mark.parametrize("says", [b"", bytes([22, 3, 1, 0, 200]), bytes([22, 3, 1, 0, 8])
                                  + b"\x01\x00\x01\x00\x03\x03\x00\x00"],
                         ids=["nothing", "a record header", "a record of a partial hello"])
def test_a_server_peer_without_a_whole_client_hello_gets_the_first_flight_deadline(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], says: bytes
) -> None:
    rig = rig_factory(default_timeout_ms=10_000, first_flight_timeout_ms=300)
    req = requests(MsgType.SERVERHELLO, AuthMode.X509)
    req.peer.sendall(says)
    started = time.monotonic()
    rig.upcall.ready(req.reply)
    rig.run_until_done(timeout=5)
    [done] = rig.upcall.dones
    assert done.status == errno.ETIMEDOUT
    assert 0.28 <= done.at - started < 1.5


def test_a_client_waits_for_its_server_under_the_request_s_deadline_only(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    """The server is the one the consumer chose (a busy NFS server, a target under load):
    the first-flight deadline is for the clients of our servers."""
    rig = rig_factory(default_timeout_ms=10_000, first_flight_timeout_ms=100)
    req = requests(timeout_ms=700)
    started = time.monotonic()
    rig.upcall.ready(req.reply)
    rig.run_until_done(timeout=5)
    assert rig.upcall.dones[0].status == errno.ETIMEDOUT
    assert rig.upcall.dones[0].at - started >= 0.65


def test_a_peer_that_sent_its_hello_has_the_whole_deadline(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI
) -> None:
    """The first-flight deadline is for silence only: a slow but speaking peer keeps the
    request's own deadline."""
    rig = rig_factory(first_flight_timeout_ms=200)
    req = requests(MsgType.SERVERHELLO, AuthMode.X509, timeout_ms=900)
    client = SSL.Connection(client_peer_context(pki, cert=False), None)
    client.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        client.do_handshake()
    req.peer.sendall(client.bio_read(65536))  # the ClientHello, and then nothing
    started = time.monotonic()
    rig.upcall.ready(req.reply)
    rig.run_until_done(timeout=5)
    assert rig.upcall.dones[0].status == errno.ETIMEDOUT
    assert rig.upcall.dones[0].at - started >= 0.85


def test_one_address_holds_at_most_max_inflight_per_peer_server_handshakes(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    rig = rig_factory(max_inflight_per_peer=2)
    held = [requests(MsgType.SERVERHELLO, AuthMode.X509) for _ in range(3)]
    rig.upcall.ready(*(req.reply for req in held))
    rig.worker.run_once(max_wait=0.01)
    [refused] = rig.upcall.dones
    assert refused.fd == held[2].reply.sockfd and refused.status == errno.EBUSY
    assert rig.worker.by_source == {"127.0.0.1": 2}
    rig.worker.drain(grace_s=0)
    assert rig.worker.by_source == {}  # every slot given back


def test_the_per_peer_limit_does_not_count_client_handshakes(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request]
) -> None:
    """Many mounts of one server are many client handshakes to one address: no limit."""
    rig = rig_factory(max_inflight_per_peer=1)
    held = [requests() for _ in range(3)]
    rig.upcall.ready(*(req.reply for req in held))
    rig.worker.run_once(max_wait=0.01)
    assert rig.upcall.dones == [] and len(rig.worker.inflight) == 3


def test_silent_server_handshakes_wait_beside_the_slots_of_the_rest(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI
) -> None:
    rig = rig_factory(max_inflight=1, max_waiting=2)
    silent = [requests(MsgType.SERVERHELLO, AuthMode.X509) for _ in range(3)]
    rig.upcall.ready(*(req.reply for req in silent))
    rig.worker.run_once(max_wait=0.01)
    # max_waiting: the third one in made the oldest silent one go
    [evicted] = rig.upcall.dones
    assert evicted.fd == silent[0].reply.sockfd and evicted.status == errno.ETIMEDOUT
    assert len(rig.worker.inflight) == 2
    good = requests()
    good.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(good.reply)
    rig.run_until_done(2)
    assert [d.status for d in rig.upcall.dones] == [errno.ETIMEDOUT, 0]  # served beside them
    assert len(rig.worker.inflight) == 2


def test_sslkeylogfile_is_wired_from_the_worker_into_its_engines(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request], pki: PKI,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlshd.agent import worker as worker_module
    from tlshd.keylog import KeyLogFile

    path = tmp_path / "keys.log"
    monkeypatch.setattr(worker_module, "KEYLOG", KeyLogFile({"SSLKEYLOGFILE": str(path)}))
    rig = rig_factory()
    req = requests()
    req.start_peer(server_peer_context(pki), server=True)
    rig.upcall.ready(req.reply)
    rig.run_until_done()
    assert rig.upcall.dones[0].status == 0
    assert b"CLIENT_TRAFFIC_SECRET_0" in path.read_bytes()


def test_without_sslkeylogfile_the_engines_get_no_key_log_sink(rig: Rig) -> None:
    assert rig.worker._chooser._io["keylog"] is None or worker_keylog_set()


def worker_keylog_set() -> bool:
    return bool(os.environ.get("SSLKEYLOGFILE"))


def test_failures_from_one_source_log_a_few_lines_then_a_summary(
    rig_factory: Callable[..., Rig], requests: Callable[..., Request],
    caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    rig = rig_factory(clock=lambda: now[0])
    garbage = [requests(MsgType.SERVERHELLO, AuthMode.X509) for _ in range(12)]
    for req in garbage:
        req.peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with caplog.at_level(logging.INFO, logger="tlshd"):
        rig.upcall.ready(*(req.reply for req in garbage))
        rig.run_until_done(12)
        now[0] += 11  # the window is over
        rig.worker.run_once(max_wait=0.01)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("status=13" in line for line in lines) == 5
    assert sum("7 more failed handshake(s) with 127.0.0.1 in 10 s" in line
               for line in lines) == 1
    assert [d.status for d in rig.upcall.dones] == [errno.EACCES] * 12  # every DONE is sent


def test_warm_up_completes_a_handshake_in_memory_and_leaves_nothing_attached(
        caplog: pytest.LogCaptureFixture) -> None:
    from tlshd.agent.worker import warm_up
    from tlshd.config import parse_config
    from tlshd.credentials.contexts import Contexts
    from tlshd.handshake import _psk

    caplog.set_level(logging.DEBUG, logger="tlshd")
    attached = len(_psk._registry)
    assert warm_up(Contexts.from_config(parse_config(""))) > 0
    assert "warm-up" not in caplog.text  # neither "did not complete" nor "failed"
    assert len(_psk._registry) == attached


def test_warm_up_that_fails_is_logged_and_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from tlshd.agent.worker import warm_up

    class NoPSK:  # a provider without PSK contexts: the warm-up cannot run
        psk_client: dict[object, object] = {}
        psk_server: dict[object, object] = {}

    warm_up(NoPSK())  # type: ignore[arg-type]
    assert "warm-up handshake failed" in caplog.text
