"""A minimal handshake agent for kernel-sim tests: raw netlink bytes, never tlshd.

``RawAgent`` talks to a kernel-sim endpoint exactly as an agent's AF_NETLINK
sockets would talk to the kernel: every request is built with the
``kernel_sim.genl`` packers and every answer is returned undecoded enough that
a test can check it byte for byte. It has two connections, like an agent with
two netlink sockets: ``cmd`` for nlctrl/ACCEPT/DONE/SETSOCKOPT and ``notify``,
the one that joins the ``tlshd`` group and receives READY. It can send any
attributes (malformed or hostile ones included) and it never substitutes or
checks anything itself.

Below the agent, in order: fixed kTLS keys with a by-hand TLS 1.3 record
sealer (what a handshake would have produced); helpers the kernel-sim test
files share (a TCP pair, a temporary network namespace, a done-callback
recorder); their pytest fixtures (a test module binds the ones it uses, e.g.
``kernel = rawagent.kernel``); and a command line that runs the agent in a
child process with other credentials::

    python rawagent.py accept ENDPOINT          -> {"errno": E}
    python rawagent.py done ENDPOINT FD STATUS  -> {"errno": E}
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kernel_sim import genl
from kernel_sim.handshake.tlshd import TLSHandshakeArgs
from kernel_sim.kernel import (
    KSIM_A_GROUP,
    KSIM_A_LEVEL,
    KSIM_A_OPTNAME,
    KSIM_A_OPTVAL,
    KSIM_A_SOCKFD,
    KSIM_CMD_ADD_MEMBERSHIP,
    KSIM_CMD_SETSOCKOPT,
    Kernel,
    endpoint_address,
    sock_cookie,
)
from kernel_sim.netns import run_in_netns
from kernel_sim.profile import MAINLINE, KernelProfile

CMD_READY, CMD_ACCEPT, CMD_DONE = 1, 2, 3
A_ACCEPT_HANDLER_CLASS = 2
A_DONE_STATUS, A_DONE_SOCKFD, A_DONE_REMOTE_AUTH = 1, 2, 3
HANDLER_CLASS_TLSHD = 1
TIMEOUT_S = 3.0
_MAX = 65536


@dataclass(frozen=True)
class Reply:
    """One received netlink message, with the fds that came with its datagram."""

    raw: bytes
    header: genl.Header
    fds: list[int] = field(default_factory=list)

    @property
    def error(self) -> int | None:
        """NLMSG_ERROR's (negative) errno, 0 for an ACK, None for a data message."""
        if self.header.type != genl.NLMSG_ERROR:
            return None
        return int(struct.unpack_from("=i", self.raw, genl.NLMSG_HDRLEN)[0])

    @property
    def cmd(self) -> int:
        return self.raw[genl.NLMSG_HDRLEN]

    @property
    def attrs(self) -> list[tuple[int, int, bytes]]:
        """(masked type, raw type, payload) in wire order; tolerant of broken bytes."""
        start = genl.NLMSG_HDRLEN + genl.GENL_HDRLEN
        return list(genl.iter_attrs(self.raw[start:], strict=False))

    def types(self) -> list[int]:
        return [t for t, _raw, _p in self.attrs]

    def all(self, attr_type: int) -> list[bytes]:
        return [p for t, _raw, p in self.attrs if t == attr_type]

    def u32(self, attr_type: int) -> int | None:
        found = self.all(attr_type)
        return genl.get_u32(found[0]) if found else None


class Conn:
    """One "netlink socket": a SOCK_SEQPACKET connection to a namespace's endpoint."""

    def __init__(self, endpoint: str, netns: str | None = None, timeout: float = TIMEOUT_S):
        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            sock.connect(endpoint_address(endpoint))
            return sock

        self.sock = run_in_netns(netns, connect)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float | None = None) -> Reply | None:
        """The next datagram's first message; None on timeout, EOFError when cut off."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data, anc, _flags, _ = self.sock.recvmsg(_MAX, socket.CMSG_SPACE(16 * 4))
        except TimeoutError:
            return None
        if not data:
            raise EOFError("the kernel closed this netlink socket")
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        return Reply(data, genl.parse_header(data), fds)

    def close(self) -> None:
        self.sock.close()


class RawAgent:
    """An agent in namespace ``netns`` (None: this one) of kernel-sim endpoint ``endpoint``."""

    def __init__(self, endpoint: str, *, netns: str | None = None, join: bool = True,
                 timeout: float = TIMEOUT_S) -> None:
        self._seq = itertools.count(1)
        self.cmd = Conn(endpoint, netns, timeout)
        self.notify = Conn(endpoint, netns, timeout)
        self.family_id, self.version, self.groups = self.resolve("handshake")
        self.ksim_id = self.resolve("kernel_sim")[0]
        if join:
            assert self.join() == 0

    def __enter__(self) -> RawAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cmd.close()
        self.notify.close()

    # --- nlctrl ---------------------------------------------------------------------

    def get_family(self, name: str) -> Reply:
        attrs = genl.nla_string(genl.CTRL_ATTR_FAMILY_NAME, name)
        return self.request(genl.GENL_ID_CTRL, genl.CTRL_CMD_GETFAMILY, attrs, version=1)

    def resolve(self, name: str) -> tuple[int, int, dict[str, int]]:
        """(family id, version, {group name: group id}) from a GETFAMILY reply."""
        reply = self.get_family(name)
        if reply.error is not None:
            raise OSError(-reply.error, f"GETFAMILY {name}")
        groups: dict[str, int] = {}
        for nest in reply.all(genl.CTRL_ATTR_MCAST_GROUPS):
            for _i, _raw, entry in genl.iter_attrs(nest):
                fields = {t: p for t, _r, p in genl.iter_attrs(entry)}
                groups[genl.get_string(fields[genl.CTRL_ATTR_MCAST_GRP_NAME])] = genl.get_u32(
                    fields[genl.CTRL_ATTR_MCAST_GRP_ID])
        family = struct.unpack("=H", reply.all(genl.CTRL_ATTR_FAMILY_ID)[0])[0]
        return family, reply.u32(genl.CTRL_ATTR_VERSION) or 0, groups

    # --- requests -------------------------------------------------------------------

    def request(self, family: int, cmd: int, attrs: bytes = b"", *, version: int = 0,
                flags: int = genl.NLM_F_REQUEST, conn: Conn | None = None) -> Reply:
        conn = conn or self.cmd
        conn.send(genl.genlmsg(family, cmd, version, attrs, seq=next(self._seq), flags=flags))
        reply = conn.recv()
        if reply is None:
            raise TimeoutError(f"no answer to command {cmd} of family {family:#x}")
        return reply

    def join(self, group: str = "tlshd") -> int:
        """``NETLINK_ADD_MEMBERSHIP`` on the notify connection; the errno of the ACK."""
        attrs = genl.nla_u32(KSIM_A_GROUP, self.groups[group])
        reply = self.request(self.ksim_id, KSIM_CMD_ADD_MEMBERSHIP, attrs, conn=self.notify,
                             flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK)
        return reply.error or 0

    def read_ready(self, timeout: float = TIMEOUT_S) -> Reply | None:
        """The next multicast on the notify connection (None if nothing came in time)."""
        return self.notify.recv(timeout)

    def accept(self, handler_class: int | None = HANDLER_CLASS_TLSHD, *,
               attrs: bytes | None = None) -> Reply:
        """ACCEPT; the reply (or NLMSG_ERROR) with any SCM_RIGHTS fd in ``fds``."""
        if attrs is None:
            attrs = b"" if handler_class is None else genl.nla_u32(
                A_ACCEPT_HANDLER_CLASS, handler_class)
        return self.request(self.family_id, CMD_ACCEPT, attrs)

    def done(self, sockfd: int | None, status: int | None = 0,
             remote_auth: tuple[int, ...] = (), *, attrs: bytes | None = None) -> int:
        """DONE with NLM_F_ACK; returns the errno the kernel acked with (0 or negative)."""
        if attrs is None:
            attrs = b"" if status is None else genl.nla_u32(A_DONE_STATUS, status)
            attrs += b"" if sockfd is None else genl.nla_s32(A_DONE_SOCKFD, sockfd)
            attrs += b"".join(genl.nla_u32(A_DONE_REMOTE_AUTH, p) for p in remote_auth)
        reply = self.request(self.family_id, CMD_DONE, attrs,
                             flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK)
        return _ack(reply)

    def setsockopt(self, fd: int, level: int, optname: int, optval: bytes) -> int:
        """The agent's ``setsockopt(fd, level, optname, optval)``; the errno (0 or negative)."""
        attrs = (genl.nla_s32(KSIM_A_SOCKFD, fd) + genl.nla_u32(KSIM_A_LEVEL, level)
                 + genl.nla_u32(KSIM_A_OPTNAME, optname) + genl.nla(KSIM_A_OPTVAL, optval))
        reply = self.request(self.ksim_id, KSIM_CMD_SETSOCKOPT, attrs,
                             flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK)
        return _ack(reply)


def _ack(reply: Reply) -> int:
    if reply.error is None:
        raise AssertionError(f"expected NLMSG_ERROR, got type {reply.header.type}")
    return reply.error


# --- kTLS keys by hand ---------------------------------------------------------------

SOL_TCP, TCP_ULP, SOL_TLS, TLS_TX, TLS_RX = 6, 31, 282, 1, 2
TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128 = 0x0304, 51
APPLICATION_DATA = 23


@dataclass(frozen=True)
class TrafficKey:
    """A fixed TLS 1.3 AES-128-GCM traffic key: what a handshake would have derived."""

    key: bytes  # 16 bytes
    iv: bytes = field(repr=False)  # 12 bytes: salt (4) || iv (8), as the kernel keeps it

    def crypto_info(self, rec_seq: int = 0) -> bytes:
        """``struct tls12_crypto_info_aes_gcm_128`` (include/uapi/linux/tls.h), 40 bytes."""
        return struct.pack("=HH8s16s4s8s", TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128,
                           self.iv[4:], self.key, self.iv[:4], rec_seq.to_bytes(8, "big"))

    def _nonce(self, seq: int) -> bytes:
        return (int.from_bytes(self.iv, "big") ^ seq).to_bytes(12, "big")

    def seal(self, seq: int, data: bytes, rtype: int = APPLICATION_DATA) -> bytes:
        """One TLS 1.3 record (RFC 8446 section 5.2)."""
        header = bytes([APPLICATION_DATA, 3, 3]) + (len(data) + 17).to_bytes(2, "big")
        return header + AESGCM(self.key).encrypt(self._nonce(seq), data + bytes([rtype]), header)

    def open(self, seq: int, record: bytes) -> tuple[int, bytes]:
        inner = AESGCM(self.key).decrypt(self._nonce(seq), record[5:], record[:5])
        inner = inner.rstrip(b"\0")
        return inner[-1], inner[:-1]


KEY_A = TrafficKey(bytes(range(16)), bytes(range(0xA0, 0xAC)))
KEY_B = TrafficKey(bytes(range(0x40, 0x50)), bytes(range(0xB0, 0xBC)))


def install_ktls(agent: RawAgent, fd: int, tx: TrafficKey, rx: TrafficKey) -> None:
    """What an agent does after its handshake: the ULP, then TX and RX (tlshd's order)."""
    assert agent.setsockopt(fd, SOL_TCP, TCP_ULP, b"tls\0") == 0
    assert agent.setsockopt(fd, SOL_TLS, TLS_TX, tx.crypto_info()) == 0
    assert agent.setsockopt(fd, SOL_TLS, TLS_RX, rx.crypto_info()) == 0


def recv_record(sock: socket.socket) -> bytes:
    """Exactly one TLS record from a plain TCP socket."""
    header = _recv_exact(sock, 5)
    return header + _recv_exact(sock, int.from_bytes(header[3:5], "big"))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise EOFError("peer closed")
        out += chunk
    return out


# --- helpers shared by the kernel-sim test files ------------------------------------


def fd_cookie(fd: int) -> int:
    """SO_COOKIE of the socket behind ``fd``: the same for every dup of one socket."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock_cookie(sock)


def unique_endpoint() -> str:
    return f"ksim-test-{uuid.uuid4().hex[:12]}"


def tcp_pair(netns: str | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair created inside ``netns``: (consumer end, peer end)."""

    def make() -> tuple[socket.socket, socket.socket]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S)
            peer, _ = listener.accept()
        peer.settimeout(TIMEOUT_S)
        return client, peer

    return run_in_netns(netns, make)


@contextlib.contextmanager
def temp_netns() -> Iterator[str]:
    """A named network namespace with loopback up; deleted on exit."""
    name = f"ksim-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class DoneRecorder:
    """A consumer's ``done(data, status, peerid)`` callback that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, int]] = []
        self.event = threading.Event()

    def __call__(self, data: Any, status: int, peerid: int) -> None:
        self.calls.append((data, status, peerid))
        self.event.set()

    def wait(self, timeout: float = TIMEOUT_S) -> tuple[Any, int, int]:
        assert self.event.wait(timeout), "the consumer's done callback never ran"
        return self.calls[0]


# --- pytest fixtures (a test module uses one by binding it: ``kernel = rawagent.kernel``) ---


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Each test leaves no thread and no fd behind (checked after its fixtures are gone)."""
    threads, fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd"))
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        extra_fds = set(os.listdir("/proc/self/fd")) - fds
        if not extra_threads and not extra_fds:
            return
        time.sleep(0.02)
    assert not extra_threads, f"leaked threads {extra_threads}"
    assert not extra_fds, f"leaked fds {[fd_target(fd) for fd in extra_fds]}"


def fd_target(fd: str) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return fd


@pytest.fixture
def endpoint() -> str:
    return unique_endpoint()


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as resources:
        yield resources


@pytest.fixture
def boot(endpoint: str, stack: contextlib.ExitStack) -> Callable[..., Kernel]:
    """Start a kernel with this process's namespace registered; stopped at teardown."""

    def start(profile: KernelProfile = MAINLINE, pending_max: int | None = None,
              **kwargs: Any) -> Kernel:
        kernel = stack.enter_context(Kernel(endpoint=endpoint, profile=profile, **kwargs))
        kernel.add_netns(None, pending_max=pending_max)
        return kernel

    return start


@pytest.fixture
def kernel(boot: Callable[..., Kernel]) -> Kernel:
    return boot()


@pytest.fixture
def connect(endpoint: str, stack: contextlib.ExitStack) -> Callable[..., RawAgent]:
    def make(netns: str | None = None, join: bool = True, **kwargs: Any) -> RawAgent:
        return stack.enter_context(RawAgent(endpoint, netns=netns, join=join, **kwargs))

    return make


@pytest.fixture
def agent(kernel: Kernel, connect: Callable[..., RawAgent]) -> RawAgent:
    return connect()


@pytest.fixture
def pair(stack: contextlib.ExitStack) -> Callable[..., tuple[socket.socket, socket.socket]]:
    """Connected TCP pairs (consumer end, peer end), closed at teardown."""

    def make(netns: str | None = None) -> tuple[socket.socket, socket.socket]:
        consumer, peer = tcp_pair(netns)
        stack.callback(peer.close)
        stack.callback(consumer.close)
        return consumer, peer

    return make


@pytest.fixture
def fds(stack: contextlib.ExitStack) -> Callable[[Reply], int]:
    """Take the one fd an ACCEPT reply carried; closed at teardown."""

    def take(reply: Reply) -> int:
        assert reply.error is None and len(reply.fds) == 1, reply
        stack.callback(close_quiet, reply.fds[0])
        return reply.fds[0]

    return take


def close_quiet(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def submit(kernel: Kernel, sock: socket.socket, how: str = "client_hello_anon",
           **args: Any) -> tuple[int, DoneRecorder]:
    done = DoneRecorder()
    rc = getattr(kernel, f"tls_{how}")(TLSHandshakeArgs(sock=sock, done=done, **args))
    return rc, done


@pytest.fixture
def accepted(kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> Callable[..., Any]:
    """Submit an anon client request and ACCEPT it: (consumer sock, peer, agent fd, done)."""

    def make(**args: Any) -> tuple[socket.socket, socket.socket, int, DoneRecorder]:
        sock, peer = pair()
        rc, done = submit(kernel, sock, **args)
        assert rc == 0
        assert agent.read_ready() is not None
        return sock, peer, fds(agent.accept()), done

    return make


# --- command line (run in a child process with other credentials) -------------------


def main(argv: list[str]) -> int:
    command, endpoint = argv[0], argv[1]
    with RawAgent(endpoint, join=False) as agent:
        if command == "accept":
            reply = agent.accept()
            for fd in reply.fds:
                socket.close(fd)
            result = reply.error or 0
        elif command == "done":
            result = agent.done(int(argv[2]), int(argv[3]))
        else:
            raise SystemExit(f"unknown command {command}")
    print(json.dumps({"errno": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
