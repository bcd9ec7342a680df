"""The far end of the burst's connections: one process, pyOpenSSL, non-blocking, many at once.

    python bench/tls_peer.py CONTROL_FD CA CERT KEY

It receives connected TCP sockets over the Unix socket CONTROL_FD (SCM_RIGHTS, one byte per
socket: ``c`` = play the TLS client, ``s`` = play the server) and runs each handshake to its
end, then keeps the connection until the other end closes it. It never goes through the agent
or kernel-sim, so a request's peer does not wait in the kernel's queue: the burst measures the
agent and the queue, not the coupling of two requests that share one. Exits when CONTROL_FD
closes and nothing is left.
"""

from __future__ import annotations

import array
import contextlib
import selectors
import socket
import sys
import time

from OpenSSL import SSL

GIVE_UP_S = 60.0


def contexts(ca: str, cert: str, key: str) -> dict[bytes, SSL.Context]:
    server = SSL.Context(SSL.TLS_METHOD)
    server.set_min_proto_version(SSL.TLS1_3_VERSION)
    server.use_certificate_chain_file(cert)
    server.use_privatekey_file(key)
    server.set_options(SSL.OP_NO_TICKET)
    client = SSL.Context(SSL.TLS_METHOD)
    client.set_min_proto_version(SSL.TLS1_3_VERSION)
    client.load_verify_locations(ca)
    client.set_verify(SSL.VERIFY_PEER)
    return {b"s": server, b"c": client}


def receive(control: socket.socket) -> list[tuple[bytes, int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = control.recvmsg(64, socket.CMSG_SPACE(64 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(zip([data[i : i + 1] for i in range(len(data))], fds, strict=False))


class Peer:
    def __init__(self, control: socket.socket, ctxs: dict[bytes, SSL.Context]) -> None:
        self.sel = selectors.DefaultSelector()
        self.ctxs, self.control = ctxs, control
        self.started: dict[int, float] = {}
        self.sel.register(control, selectors.EVENT_READ, None)

    def add(self, role: bytes, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = SSL.Connection(self.ctxs[role], sock)
        if role == b"c":
            conn.set_tlsext_host_name(b"localhost")
            conn.set_connect_state()
        else:
            conn.set_accept_state()
        self.started[fd] = time.monotonic()
        self.step((conn, sock))

    def step(self, item: tuple[SSL.Connection | None, socket.socket]) -> None:
        conn, sock = item
        if conn is None:
            self.drain(sock)
            return
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._wait(item, selectors.EVENT_READ)
            return
        except SSL.WantWriteError:
            self._wait(item, selectors.EVENT_WRITE)
            return
        except (SSL.Error, OSError):
            self._close(sock)  # the agent's side failed or went away: its DONE tells the story
            return
        # Done: keep the connection until the consumer closes it. Closing first would take the
        # agent's socket out of ESTABLISHED before it installs kTLS (TCP_ULP: ENOTCONN).
        self._wait((None, sock), selectors.EVENT_READ)

    def drain(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def _wait(self, item: tuple[SSL.Connection | None, socket.socket], events: int) -> None:
        try:
            self.sel.modify(item[1], events, item)
        except KeyError:
            self.sel.register(item[1], events, item)

    def _close(self, sock: socket.socket) -> None:
        self.started.pop(sock.fileno(), None)
        with contextlib.suppress(KeyError):
            self.sel.unregister(sock)
        sock.close()

    def run(self) -> None:
        open_control = True
        while open_control or self.started:
            for key, _events in self.sel.select(1.0):
                if key.data is None:
                    items = receive(self.control)
                    if not items:
                        self.sel.unregister(self.control)
                        open_control = False
                    for role, fd in items:
                        self.add(role, fd)
                else:
                    self.step(key.data)
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in list(self.sel.get_map().values()):
            if key.data is not None and now - self.started.get(key.fd, now) > GIVE_UP_S:
                self._close(key.data[1])


def main() -> int:
    control_fd, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    control = socket.socket(fileno=control_fd)
    Peer(control, contexts(ca, cert, key)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
