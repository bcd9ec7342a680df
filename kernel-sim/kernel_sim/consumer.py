"""Kernel consumers of the handshake upcall, behaving like Linux's own.

* ``NFSClient`` (net/sunrpc/xprtsock.c): connects, sends an RPC NULL call with
  AUTH_TLS credentials (RFC 9289 §4.1), requires the ``STARTTLS`` verifier,
  then ``tls_client_hello_anon`` (xprtsec=tls) or ``tls_client_hello_x509``
  (xprtsec=mtls) with ``peername`` = the server name and no timeout, waits
  ``XS_TLS_HANDSHAKE_TO`` = 10 s, cancels on timeout (-ETIMEDOUT). Status 0,
  -EACCES and -ETIMEDOUT pass through; anything else becomes -EACCES.
* ``NFSServer`` (net/sunrpc/svcsock.c): answers the probe with ``STARTTLS``,
  then ``tls_server_hello_x509`` with no cert, key, peername or timeout, waits
  ``SVC_HANDSHAKE_TO`` = 20 s. A non-zero peer id marks the peer authenticated
  (XPT_PEER_AUTH), which an ``mtls`` export requires.

After a successful handshake both exchange application data through the
kTLS record layer (``Kernel.ktls``): the client sends RPC NULL calls over TLS
and the server answers them, so every byte crosses the agent-installed keys.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from kernel_sim.handshake.tlshd import TLS_NO_PEERID, TLSHandshakeArgs
from kernel_sim.kernel import Kernel
from kernel_sim.tls_ulp import KTLSSocket

XS_TLS_HANDSHAKE_TO = 10.0
SVC_HANDSHAKE_TO = 20.0
RPC_AUTH_NONE = 0
RPC_AUTH_TLS = 7
RPC_CALL, RPC_REPLY = 0, 1
NFS_PROGRAM, NFS_V4 = 100003, 4
STARTTLS = b"STARTTLS"
LAST_FRAGMENT = 0x80000000


@dataclass(frozen=True)
class HandshakeOutcome:
    """What the consumer's done callback saw (status as the consumer sees it)."""

    status: int
    peerid: int
    seconds: float
    tags: tuple[str, ...] = ()  # the session tags DONE carried (a kernel with the tags series)


def wait_handshake(
    kernel: Kernel, sock: socket.socket, submit: Any, args: TLSHandshakeArgs, timeout_s: float
) -> HandshakeOutcome:
    """Submit, wait for ``done`` up to ``timeout_s``, cancel on timeout (consumer pattern)."""
    done = threading.Event()
    box: dict[str, int] = {}

    def on_done(_data: Any, status: int, peerid: int) -> None:
        box.update(status=status, peerid=peerid)
        done.set()

    args.done, args.sock = on_done, sock
    start = time.monotonic()
    rc = submit(args)
    if rc < 0:
        return HandshakeOutcome(rc, TLS_NO_PEERID, 0.0)
    if not done.wait(timeout_s) and kernel.tls_handshake_cancel(sock):
        return HandshakeOutcome(-errno.ETIMEDOUT, TLS_NO_PEERID, time.monotonic() - start)
    done.wait()
    return HandshakeOutcome(box["status"], box["peerid"], time.monotonic() - start,
                            tuple(args.session_tags))


# --- ONC RPC record marking (RFC 5531) --------------------------------------------


def rpc_null_call(xid: int, flavor: int) -> bytes:
    body = struct.pack(">IIIIII", xid, RPC_CALL, 2, NFS_PROGRAM, NFS_V4, 0)
    body += struct.pack(">II", flavor, 0) + struct.pack(">II", RPC_AUTH_NONE, 0)
    return struct.pack(">I", LAST_FRAGMENT | len(body)) + body


def rpc_null_reply(xid: int, verifier: bytes) -> bytes:
    body = struct.pack(">III", xid, RPC_REPLY, 0)
    body += struct.pack(">II", RPC_AUTH_NONE, len(verifier)) + verifier + struct.pack(">I", 0)
    return struct.pack(">I", LAST_FRAGMENT | len(body)) + body


def parse_rpc(record: bytes) -> tuple[int, int, bytes]:
    """(xid, msg type, rest) of one RPC message body."""
    xid, mtype = struct.unpack_from(">II", record)
    return xid, mtype, record[8:]


def read_record(recv: Any) -> bytes:
    """Read one record-marked RPC message with ``recv(n) -> bytes`` (exact reads)."""
    marker = _read_exact(recv, 4)
    length = struct.unpack(">I", marker)[0] & ~LAST_FRAGMENT
    return _read_exact(recv, length)


def _read_exact(recv: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed the RPC stream")
        out += chunk
    return out


def _verifier_of(reply: bytes) -> bytes:
    _xid, _mtype, rest = parse_rpc(reply)
    _stat, _flavor, length = struct.unpack_from(">III", rest)
    return rest[12 : 12 + length]


def _ktls_recv(ktls: KTLSSocket) -> Any:
    """recv() over kTLS for the RPC layer: data records only (xs_tls_read_record)."""

    def recv(n: int) -> bytes:
        rtype, data = ktls.recvmsg(n)
        if rtype != 23:
            raise ConnectionError(f"non-data TLS record type {rtype} on the RPC stream")
        return data

    return recv


# --- NFS client ----------------------------------------------------------------------


class NFSClient:
    """``xs_tcp_tls_setup_socket`` + ``xs_tls_handshake_sync``, then RPC over kTLS."""

    def __init__(
        self, kernel: Kernel, *, xprtsec: str = "tls", cert_serial: int = 0,
        privkey_serial: int = 0,
        timeout_s: float = XS_TLS_HANDSHAKE_TO,
    ) -> None:
        if xprtsec not in ("none", "tls", "mtls"):
            raise ValueError("xprtsec is none, tls or mtls")
        self.kernel, self.xprtsec, self.timeout_s = kernel, xprtsec, timeout_s
        self.cert_serial, self.privkey_serial = cert_serial, privkey_serial
        self.sock: socket.socket | None = None
        self.ktls: KTLSSocket | None = None

    def mount(self, sock: socket.socket, servername: str) -> HandshakeOutcome:
        """Probe with AUTH_TLS on connected ``sock``, then hand it to the agent.

        ``xprtsec=none`` sends its first call with AUTH_NONE and no handshake (status 0):
        whether the export accepts that is the server's decision (:meth:`NFSServer.admits`).
        """
        self.sock = sock
        if self.xprtsec == "none":
            sock.sendall(rpc_null_call(1, RPC_AUTH_NONE))
            return HandshakeOutcome(0, TLS_NO_PEERID, 0.0)
        sock.sendall(rpc_null_call(1, RPC_AUTH_TLS))
        if _verifier_of(read_record(sock.recv)) != STARTTLS:
            return HandshakeOutcome(-errno.EACCES, TLS_NO_PEERID, 0.0)  # rpc_tls_unavailable
        args = TLSHandshakeArgs(sock=sock, done=_unused, peername=servername,
                                my_cert=self.cert_serial, my_privkey=self.privkey_serial)
        submit = (self.kernel.tls_client_hello_x509 if self.xprtsec == "mtls"
                  else self.kernel.tls_client_hello_anon)
        out = wait_handshake(self.kernel, sock, submit, args, self.timeout_s)
        if out.status not in (0, -errno.EACCES, -errno.ETIMEDOUT):
            out = HandshakeOutcome(-errno.EACCES, out.peerid, out.seconds)
        if out.status == 0:
            self.ktls = self.kernel.ktls(sock)
        return out

    def null_call(self, xid: int) -> bytes:
        """An RPC NULL call over TLS; returns the reply's verifier."""
        assert self.ktls is not None
        self.ktls.sendmsg(rpc_null_call(xid, RPC_AUTH_NONE))
        return _verifier_of(read_record(_ktls_recv(self.ktls)))

    def close(self) -> None:
        if self.sock is not None:
            self.kernel.sock_release(self.sock)
            self.sock = None


def _unused(_data: Any, _status: int, _peerid: int) -> None:
    """Placeholder replaced by wait_handshake before submission."""


# --- NFS server ----------------------------------------------------------------------


class NFSServer:
    """``svc_tcp_handshake``: probe answer, server x509 handshake, then serve RPC."""

    def __init__(self, kernel: Kernel, *, xprtsec: str = "tls",
                 timeout_s: float = SVC_HANDSHAKE_TO) -> None:
        self.kernel, self.xprtsec, self.timeout_s = kernel, xprtsec, timeout_s

    def handshake(self, conn: socket.socket) -> tuple[HandshakeOutcome, bool]:
        """Returns (outcome, peer_authenticated); ``outcome`` is the handshake's own.

        A first call without AUTH_TLS means no handshake: (-EPERM, False), which
        :meth:`admits` turns into the refusal a TLS-only export gives."""
        xid, _mtype, rest = parse_rpc(read_record(conn.recv))
        flavor = struct.unpack_from(">I", rest, 16)[0]
        if flavor != RPC_AUTH_TLS:
            return HandshakeOutcome(-errno.EPERM, TLS_NO_PEERID, 0.0), False
        conn.sendall(rpc_null_reply(xid, STARTTLS))
        args = TLSHandshakeArgs(sock=conn, done=_unused)
        out = wait_handshake(self.kernel, conn, self.kernel.tls_server_hello_x509, args,
                             self.timeout_s)
        return out, out.status == 0 and out.peerid != TLS_NO_PEERID

    def admits(self, outcome: HandshakeOutcome, peer_auth: bool) -> int:
        """The export's ``xprtsec=`` check (``check_xprtsec_policy``): 0, or -EPERM as the
        mount sees it. A TLS-only export refuses a transport without TLS; an mtls export
        also refuses a TLS transport whose peer presented no certificate. On Linux 6.12 both
        handshakes of the latter succeed (kTLS is installed) and only the mount fails."""
        if outcome.status != 0:
            return -errno.EPERM
        if self.xprtsec == "mtls" and not peer_auth:
            return -errno.EPERM
        return 0

    def serve(self, conn: socket.socket, calls: int) -> int:
        """Answer ``calls`` RPC NULL calls over kTLS; returns how many were answered."""
        ktls = self.kernel.ktls(conn)
        for served in range(calls):
            try:
                xid, _mtype, _rest = parse_rpc(read_record(_ktls_recv(ktls)))
            except (ConnectionError, OSError):
                return served
            ktls.sendmsg(rpc_null_reply(xid, b""))
        return calls


# --- a plain consumer, for tests against independent TLS peers -----------------------


class TLSConsumer:
    """A consumer with no protocol of its own: hand a connected socket to the agent.

    ``client(...)`` / ``server(...)`` submit the matching request and wait like
    a kernel consumer (cancel on timeout). On success ``ktls`` is the socket's
    kTLS view for application data.
    """

    def __init__(self, kernel: Kernel, *, timeout_s: float = 10.0, timeout_ms: int = 0) -> None:
        self.kernel, self.timeout_s, self.timeout_ms = kernel, timeout_s, timeout_ms
        self.ktls: KTLSSocket | None = None

    def client(self, sock: socket.socket, *, peername: str | None = None, auth: str = "x509",
               cert_serial: int = 0, privkey_serial: int = 0) -> HandshakeOutcome:
        args = TLSHandshakeArgs(sock=sock, done=_unused, peername=peername,
                                timeout_ms=self.timeout_ms, my_cert=cert_serial,
                                my_privkey=privkey_serial)
        submit = (self.kernel.tls_client_hello_anon if auth == "anon"
                  else self.kernel.tls_client_hello_x509)
        return self._finish(sock, wait_handshake(self.kernel, sock, submit, args, self.timeout_s))

    def server(self, sock: socket.socket) -> HandshakeOutcome:
        args = TLSHandshakeArgs(sock=sock, done=_unused, timeout_ms=self.timeout_ms)
        out = wait_handshake(self.kernel, sock, self.kernel.tls_server_hello_x509, args,
                             self.timeout_s)
        return self._finish(sock, out)

    def psk_client(self, sock: socket.socket, peerids: tuple[int, ...], *,
                   keyring: int = 0) -> HandshakeOutcome:
        args = TLSHandshakeArgs(sock=sock, done=_unused, timeout_ms=self.timeout_ms,
                                my_peerids=peerids, keyring=keyring)
        out = wait_handshake(self.kernel, sock, self.kernel.tls_client_hello_psk, args,
                             self.timeout_s)
        return self._finish(sock, out)

    def psk_server(self, sock: socket.socket, *, keyring: int = 0) -> HandshakeOutcome:
        args = TLSHandshakeArgs(sock=sock, done=_unused, timeout_ms=self.timeout_ms,
                                keyring=keyring)
        out = wait_handshake(self.kernel, sock, self.kernel.tls_server_hello_psk, args,
                             self.timeout_s)
        return self._finish(sock, out)

    def _finish(self, sock: socket.socket, out: HandshakeOutcome) -> HandshakeOutcome:
        if out.status == 0:
            self.ktls = self.kernel.ktls(sock)
        return out
