"""``tlshd wrap``: TLS under an unmodified program's connect() and accept().

    tlshd wrap [--policy FILE] [--server-name NAME] -- PROGRAM ARGS...

The program runs under a seccomp filter that hands its connect, accept and accept4 calls to
this process (:mod:`tlshd.seccomp`, seccomp user notification). For a TCP socket over IPv4
or IPv6 that the wrap policy selects (every one, without ``--policy``):

* **connect**: this process connects the program's own socket (a copy of its fd, the same
  open file description), asks the agent for the TLS handshake as the client
  (:func:`tlshd.app.secure_client`; the agent installs kTLS on the socket), and only then
  lets the program's connect() return 0. A failure fails connect() with the errno of the
  step that failed, and a socket whose handshake failed is shut down: the program never
  sends plaintext where the policy says TLS.
* **accept/accept4**: this process accepts the next connection, asks the agent for the
  handshake as the server, writes the peer's address where the program asked, and installs
  the connection in the program as the syscall's result (with accept4's SOCK_CLOEXEC and
  SOCK_NONBLOCK). A peer whose handshake fails is dropped and never reaches the program: a
  blocking accept() waits for the next connection, a non-blocking one fails with EAGAIN.

Everything else runs as it is: other sockets, other syscalls, connections the policy leaves
in plain. The agent decides, as for any application request, whether this uid and the
program (``for_pid``: its executable and cgroup) may have TLS at all. This is a convenience
for programs that cannot be changed, not a confinement: a program can reach the network
around it (io_uring, a 32-bit syscall), and the agent's policy is what enforces.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tlshd import seccomp
from tlshd.app import DEFAULT_ENDPOINT, Secured, SecureSocketError, secure_client, secure_server
from tlshd.policy import Facts, Policy, facts_of, parse_policy_texts, process_ids

log = logging.getLogger("tlshd.wrap")

MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage)
_POLL_MS = 200  # a blocking accept rechecks that its caller still waits
_SIN = struct.Struct("=H")  # sa_family, native order
_SIN_TAIL = struct.Struct("!H4s8x")  # port, address, zero
_SIN6_TAIL = struct.Struct("!HI16s")  # port, flowinfo, address; then scope id (native)
_ACCEPT4_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


@dataclass(frozen=True)
class WrapOptions:
    argv: Sequence[str]
    policy: Policy | None = None  # None: every TCP connection gets TLS
    server_name: str | None = None  # outbound: the name the server's certificate must carry
    endpoint: str = DEFAULT_ENDPOINT
    timeout_ms: int = 10_000


@dataclass(frozen=True)
class Choice:
    secure: bool
    why: str


def load_wrap_policy(path: Path) -> Policy:
    """A wrap policy file: the agent's rule format; problems are the caller's to report."""
    text = path.read_text(encoding="utf-8")
    return parse_policy_texts([(path.name, text)], path.parent)


def choose(policy: Policy | None, facts: Facts) -> Choice:
    """TLS for this connection? The first matching rule says (``tls: false``: plain), and a
    connection no rule matches stays plain. Without a policy: TLS for every one."""
    if policy is None:
        return Choice(True, "every TCP connection (no --policy)")
    for rule in policy.rules:
        if rule.matches(facts):
            return Choice(rule.tls, f"rule {rule.name}")
    return Choice(False, "no rule matches")


def parse_sockaddr(raw: bytes) -> tuple[str, int] | tuple[str, int, int, int] | None:
    """An IPv4 or IPv6 ``struct sockaddr`` as Python's socket module takes it; None for any
    other family (AF_UNSPEC dissolves an association: the kernel does that itself)."""
    if len(raw) < _SIN.size:
        return None
    (family,) = _SIN.unpack_from(raw)
    if family == socket.AF_INET and len(raw) >= 16:
        port, address = _SIN_TAIL.unpack_from(raw, 2)[:2]
        return socket.inet_ntop(socket.AF_INET, address), port
    if family == socket.AF_INET6 and len(raw) >= 28:
        port, flowinfo, address = _SIN6_TAIL.unpack_from(raw, 2)
        (scope,) = struct.unpack_from("=I", raw, 24)
        return socket.inet_ntop(socket.AF_INET6, address), port, flowinfo, scope
    return None


def format_sockaddr(family: int, address: tuple[object, ...]) -> bytes:
    """The ``struct sockaddr`` an accept() writes for a peer."""
    host, port = str(address[0]), int(str(address[1]))
    if family == socket.AF_INET:
        return _SIN.pack(family) + _SIN_TAIL.pack(port, socket.inet_pton(family, host))
    flowinfo = int(str(address[2])) if len(address) > 2 else 0
    scope = int(str(address[3])) if len(address) > 3 else 0
    return _SIN.pack(family) + _SIN6_TAIL.pack(port, flowinfo, socket.inet_pton(
        family, host.split("%", 1)[0])) + struct.pack("=I", scope)


# --- the supervisor --------------------------------------------------------------------------

class Supervisor:
    """Reads the filter's notifications and answers each from its own thread."""

    def __init__(self, arch: seccomp.Arch, listener: int, options: WrapOptions) -> None:
        self.arch, self.listener, self.options = arch, listener, options
        self.names = seccomp.syscall_numbers(arch)
        self.handled = {"tls": 0, "plain": 0, "failed": 0}
        self._lock = threading.Lock()

    def serve(self) -> None:
        """Until no process is left under the filter (the listener hangs up)."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            events = poller.poll(1000)
            if any(mask & (select.POLLHUP | select.POLLERR) for _, mask in events):
                return
            if not events:
                continue
            try:
                notif = seccomp.receive(self.listener)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the caller went away before we read it
                raise
            threading.Thread(target=self.handle, args=(notif,), daemon=True).start()

    def handle(self, notif: seccomp.Notification) -> None:
        name = self.names.get(notif.nr)
        try:
            if name is None or notif.arch != self.arch.audit:
                seccomp.proceed(self.listener, notif.id)
            elif name == "connect":
                self._connect(notif)
            else:
                self._accept(notif, notif.args[3] if name == "accept4" else 0)
        except Exception as exc:  # the caller must get an answer, never a hang
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            log.warning("tlshd wrap: %s by pid %d failed: %s", name, notif.pid, exc)
            with contextlib.suppress(OSError):
                seccomp.respond(self.listener, notif.id, error=code)

    def _count(self, what: str) -> None:
        with self._lock:
            self.handled[what] += 1

    # --- connect ---------------------------------------------------------------------------

    def _connect(self, notif: seccomp.Notification) -> None:
        fd, address, length = _s32(notif.args[0]), notif.args[1], notif.args[2]
        with _caller_socket(self.arch, notif.pid, fd) as sock:
            if sock is None or not address or not 0 < length <= MAX_SOCKADDR:
                seccomp.proceed(self.listener, notif.id)
                return
            with seccomp.Memory(notif.pid) as memory:
                target = parse_sockaddr(memory.read(address, length))
            if target is None:
                seccomp.proceed(self.listener, notif.id)
                return
            facts = _facts(_tgid(notif.pid), "outbound", remote=(target[0], target[1]))
            choice = choose(self.options.policy, facts)
            if not choice.secure:
                self._count("plain")
                log.info("tlshd wrap: connect to %s port %d in plain (%s)", target[0],
                         target[1], choice.why)
                seccomp.proceed(self.listener, notif.id)
                return
            error = self._secure_connect(sock, target, notif)
            seccomp.respond(self.listener, notif.id, error=error)

    def _secure_connect(self, sock: socket.socket, target: tuple[object, ...],
                        notif: seccomp.Notification) -> int:
        """Connect and hand over the socket for TLS: 0, or the errno connect() fails with."""
        where = f"{target[0]} port {target[1]}"
        with _flags_kept(sock.fileno()):
            sock.settimeout(self.options.timeout_ms / 1000)
            try:
                sock.connect(target)
            except TimeoutError:
                return self._failed(f"connect to {where}", errno.ETIMEDOUT, "timed out")
            except OSError as exc:
                return self._failed(f"connect to {where}", exc.errno or errno.EIO, str(exc))
            sock.setblocking(True)
            try:
                secured = secure_client(sock, self.options.server_name,
                                        timeout_ms=self.options.timeout_ms,
                                        endpoint=self.options.endpoint,
                                        for_pid=_tgid(notif.pid))
            except SecureSocketError as exc:
                _shut(sock)
                return self._failed(f"TLS to {where}", exc.errno or errno.EIO, str(exc))
            if secured.data:
                # the server spoke first and the agent read it before the hand-over: the
                # program cannot be given those bytes, so it is not given the connection
                _shut(sock)
                return self._failed(f"TLS to {where}", errno.EPROTO,
                                    f"the server sent {len(secured.data)} bytes before the "
                                    "hand-over (a server that speaks first)")
        self._count("tls")
        log.info("tlshd wrap: connect to %s: TLS, peer %s, %s", where, secured.peer or "-",
                 secured.cipher)
        return 0

    def _failed(self, what: str, code: int, reason: str) -> int:
        self._count("failed")
        log.warning("tlshd wrap: %s failed (%s): %s", what, errno.errorcode.get(code, code),
                    reason)
        return code

    # --- accept ----------------------------------------------------------------------------

    def _accept(self, notif: seccomp.Notification, flags: int) -> None:
        fd, address, length_at = _s32(notif.args[0]), notif.args[1], notif.args[2]
        with _caller_socket(self.arch, notif.pid, fd) as listening:
            if listening is None or flags & ~_ACCEPT4_FLAGS:
                seccomp.proceed(self.listener, notif.id)  # the kernel's own answer (EINVAL)
                return
            nonblocking = bool(fcntl.fcntl(listening.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
            while True:
                conn = self._next_connection(listening, nonblocking, notif)
                if conn is None:
                    return
                if self._serve_connection(conn, notif):
                    break
                conn.close()
                if nonblocking:
                    seccomp.respond(self.listener, notif.id, error=errno.EAGAIN)
                    return
            with conn:
                self._hand_over(conn, notif, address, length_at, flags)

    def _next_connection(self, listening: socket.socket, nonblocking: bool,
                         notif: seccomp.Notification) -> socket.socket | None:
        """The next connection, or None when the caller has been answered or is gone."""
        while not nonblocking and not select.select([listening], [], [], _POLL_MS / 1000)[0]:
            if not seccomp.still_waiting(self.listener, notif.id):
                return None
        try:
            conn, _ = listening.accept()
        except BlockingIOError:
            seccomp.respond(self.listener, notif.id, error=errno.EAGAIN)
            return None
        except OSError as exc:
            seccomp.respond(self.listener, notif.id, error=exc.errno or errno.EIO)
            return None
        conn.setblocking(True)
        return conn

    def _serve_connection(self, conn: socket.socket, notif: seccomp.Notification) -> bool:
        """TLS on an accepted connection if the policy says so; False: drop it."""
        peer, local = conn.getpeername(), conn.getsockname()
        where = f"{peer[0]} port {peer[1]}"
        facts = _facts(_tgid(notif.pid), "inbound", remote=(peer[0], peer[1]),
                       local=(local[0], local[1]))
        choice = choose(self.options.policy, facts)
        if not choice.secure:
            self._count("plain")
            log.info("tlshd wrap: accept from %s in plain (%s)", where, choice.why)
            return True
        try:
            secured: Secured = secure_server(conn, timeout_ms=self.options.timeout_ms,
                                             endpoint=self.options.endpoint,
                                             for_pid=_tgid(notif.pid))
        except SecureSocketError as exc:
            self._failed(f"TLS from {where}", exc.errno or errno.EIO, f"{exc}; dropped")
            return False
        self._count("tls")
        log.info("tlshd wrap: accept from %s: TLS, peer %s, %s", where, secured.peer or "-",
                 secured.cipher)
        return True

    def _hand_over(self, conn: socket.socket, notif: seccomp.Notification, address: int,
                   length_at: int, flags: int) -> None:
        """The peer's address where the caller asked, then the fd as accept's result."""
        if address:
            raw = format_sockaddr(conn.family, conn.getpeername())
            with seccomp.Memory(notif.pid) as memory:
                (room,) = struct.unpack("=I", memory.read(length_at, 4))
                memory.write(address, raw[:room])
                memory.write(length_at, struct.pack("=I", len(raw)))
        status = fcntl.fcntl(conn.fileno(), fcntl.F_GETFL)
        wanted = status | os.O_NONBLOCK if flags & socket.SOCK_NONBLOCK else \
            status & ~os.O_NONBLOCK
        fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, wanted)
        seccomp.send_fd(self.listener, notif.id, conn.fileno(),
                        cloexec=bool(flags & socket.SOCK_CLOEXEC))


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _tgid(tid: int) -> int:
    """The process (thread group) of a thread id."""
    try:
        return process_ids(tid)[0]
    except (OSError, ValueError, KeyError, IndexError):
        return tid


def _facts(pid: int, direction: str, remote: tuple[str, int] | None = None,
           local: tuple[str, int] | None = None) -> Facts:
    """The facts the agent's policy would see for process ``pid``, with these addresses."""
    try:
        uid = process_ids(pid)[2]
    except (OSError, ValueError, KeyError, IndexError):
        uid = os.getuid()
    return dataclasses.replace(facts_of(pid, uid, direction), remote=remote, local=local)


@contextlib.contextmanager
def _caller_socket(arch: seccomp.Arch, tid: int, fd: int) -> Iterator[socket.socket | None]:
    """A copy of the caller's fd as a socket, if it is a TCP socket over IPv4 or IPv6."""
    copy = -1
    try:
        pidfd = os.pidfd_open(_tgid(tid))
    except OSError:
        yield None
        return
    try:
        copy = seccomp.get_fd(arch, pidfd, fd)
    except OSError:
        copy = -1
    finally:
        os.close(pidfd)
    if copy < 0:
        yield None
        return
    try:
        sock = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        yield None
        return
    with sock:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and \
            sock.type == socket.SOCK_STREAM and sock.proto in (0, socket.IPPROTO_TCP)
        yield sock if tcp else None


@contextlib.contextmanager
def _flags_kept(fd: int) -> Iterator[None]:
    """The file status flags (O_NONBLOCK) of the caller's open file description, as they
    were: what this process does on its copy must not change the caller's socket."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- the program ---------------------------------------------------------------------------

def run(options: WrapOptions) -> int:
    """Run the program under the filter; its exit status (128 + N for a signal N)."""
    arch = seccomp.arch()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _child(arch, theirs, list(options.argv))
    theirs.close()
    with ours:
        listener = _receive_listener(ours)
        if listener < 0:
            os.waitpid(pid, 0)
            return 127
        supervisor = Supervisor(arch, listener, options)
        threading.Thread(target=supervisor.serve, daemon=True).start()
        exec_error = ours.recv(512)  # b"": the exec succeeded (the channel closed on exec)
    if exec_error:
        print(f"tlshd wrap: {exec_error.decode(errors='replace')}", file=sys.stderr)
    status = _wait_forwarding_signals(pid)
    if exec_error:
        return 127
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else \
        128 + os.WTERMSIG(status)


def _child(arch: seccomp.Arch, channel: socket.socket, argv: list[str]) -> None:
    try:
        listener = seccomp.install_filter(arch)
        channel.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [listener]))])
        os.close(listener)
    except OSError as exc:
        with contextlib.suppress(OSError):
            channel.send(f"filter: {exc.strerror or exc}".encode())
        os._exit(127)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        with contextlib.suppress(OSError):
            channel.send(f"{argv[0]}: {exc.strerror or exc}".encode())
    os._exit(127)


def _receive_listener(channel: socket.socket) -> int:
    data, ancdata, _, _ = channel.recvmsg(512, socket.CMSG_SPACE(4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(payload) >= 4:
            return int(array.array("i", payload[:4])[0])
    print(f"tlshd wrap: {data.decode(errors='replace') or 'the child died'}", file=sys.stderr)
    return -1


def _wait_forwarding_signals(pid: int) -> int:
    """Wait for the program; SIGTERM and SIGHUP go on to it, and a terminal's SIGINT and
    SIGQUIT reach it by themselves (this process ignores them)."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: _forward(pid, number))
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _forward(pid: int, number: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, number)
