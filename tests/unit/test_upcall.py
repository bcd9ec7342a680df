"""tlshd.upcall: the AF_NETLINK transport against this host's kernel, and SimUpcall
against an in-process kernel-sim.

This host's kernel has no ``handshake`` family, so the netlink tests prove the
GETFAMILY round trip to nlctrl and the error paths; the rest of the protocol
runs against kernel-sim, which carries the same netlink bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel_sim.faults import MALFORMED_MODES
from kernel_sim.handshake.tlshd import TLSHandshakeArgs
from kernel_sim.kernel import Kernel, NetNS
from tlshd.errors import NetlinkError, TransportError
from tlshd.ktls import (
    SOL_TCP,
    SOL_TLS,
    TCP_ULP,
    TLS_RX,
    TLS_TX,
    TLS_ULP_NAME,
    BatchSockoptError,
)
from tlshd.netlink.spec import AuthMode, MsgType
from tlshd.upcall import BrokenAcceptError, NetlinkUpcall, SimUpcall, open_upcall

SO_COOKIE = 57
CLONE_NEWNET = 0x40000000
WAIT_S = 5.0


def unique_name() -> str:
    return f"tlshd-unit-{uuid.uuid4().hex[:10]}"


def cookie(fd: int) -> int:
    dup = socket.socket(fileno=os.dup(fd))
    with dup:
        return int(struct.unpack("=Q", dup.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def open_fds() -> set[int]:
    """This process's open fds (the one listdir itself used is closed again: left out)."""
    return {int(name) for name in os.listdir("/proc/self/fd") if _is_open(int(name))}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def has_handshake_family() -> bool:
    try:
        NetlinkUpcall().close()
    except (NetlinkError, TransportError, OSError):
        return False
    return True


needs_no_family = pytest.mark.skipif(
    has_handshake_family(), reason="this kernel has the handshake family"
)


# --- the real kernel -----------------------------------------------------------------


@needs_no_family
def test_netlink_upcall_without_the_family_raises_enoent() -> None:
    before = open_fds()

    with pytest.raises(NetlinkError) as caught:
        NetlinkUpcall()

    assert caught.value.errno == errno.ENOENT
    assert "resolve family" in str(caught.value)
    assert open_fds() == before


@needs_no_family
def test_open_upcall_netlink_raises_the_same_enoent() -> None:
    with pytest.raises(NetlinkError) as caught:
        open_upcall("netlink")

    assert caught.value.errno == errno.ENOENT


def in_fresh_netns(fn: Callable[[], object]) -> BaseException | None:
    """Run ``fn`` in a thread unshared into a new, empty network namespace; its exception.

    CLONE_NEWNET moves only the calling thread; the namespace goes when the thread ends.
    Nothing (not even a kernel-sim someone runs at the default name) listens there.
    """
    outcome: list[BaseException | None] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            outcome.append(OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)"))
            return
        try:
            fn()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(WAIT_S)
    assert outcome, "the netns thread did not finish"
    return outcome[0]


@needs_no_family
def test_auto_without_family_or_simulator_points_at_config_net_handshake() -> None:
    error = in_fresh_netns(lambda: open_upcall("auto"))

    assert isinstance(error, TransportError), error
    assert "CONFIG_NET_HANDSHAKE" in str(error)
    assert "ENOENT" in str(error)


@needs_no_family
def test_auto_never_falls_back_to_a_kernel_sim_endpoint() -> None:
    """Whoever binds kernel-sim's abstract name would get the ACCEPTs, and with them the
    session keys in the setsockopt messages: auto means the kernel's family, nothing else."""
    connected: list[bool] = []

    def with_a_listener() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(b"\0kernel-sim/genl")  # the default endpoint of this namespace
        listener.listen(4)
        listener.setblocking(False)
        try:
            open_upcall("auto")
        finally:
            try:
                listener.accept()[0].close()
                connected.append(True)
            except BlockingIOError:
                connected.append(False)
            listener.close()

    error = in_fresh_netns(with_a_listener)

    assert isinstance(error, TransportError), error
    assert "CONFIG_NET_HANDSHAKE" in str(error) and "only when named" in str(error)
    assert connected == [False]


def rogue_endpoint(name: str, uid: int) -> tuple[int, int]:
    """A child process that drops to ``uid`` and binds the kernel-sim endpoint ``name``;
    (its pid, the read end of a pipe that says it listens)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(uid)
            os.setuid(uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(b"\0" + name.encode() + b"/genl")
            listener.listen(8)
            os.write(ready_w, b"1")
            while True:
                listener.accept()  # and then says nothing: a client must not even ask
        finally:
            os._exit(1)
    os.close(ready_w)
    return pid, ready_r


@pytest.mark.skipif(os.geteuid() != 0, reason="binding as another user needs root")
def test_a_kernel_sim_endpoint_bound_by_another_user_is_refused() -> None:
    from tlshd import early

    name = unique_name()
    pid, ready = rogue_endpoint(name, 65534)  # nobody
    try:
        assert os.read(ready, 1) == b"1"
        with pytest.raises(TransportError) as caught:
            open_upcall(f"kernel-sim:{name}")
        with pytest.raises(ValueError) as early_caught:
            early._hold_sim(name)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready)
    assert "served by uid 65534" in str(caught.value) and "refused" in str(caught.value)
    assert "uid 65534" in str(early_caught.value)


def test_kernel_sim_endpoint_nobody_listens_on_is_named() -> None:
    name = unique_name()

    with pytest.raises(TransportError) as caught:
        open_upcall(f"kernel-sim:{name}")

    assert name in str(caught.value)


# --- kernel-sim ------------------------------------------------------------------------


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    with Kernel(endpoint=unique_name()) as k:
        k.add_netns(None)
        yield k


@pytest.fixture
def ns(kernel: Kernel) -> NetNS:
    probe = socket.socket()
    with probe:
        return kernel.netns_of(probe)


@pytest.fixture
def agent(kernel: Kernel) -> Iterator[SimUpcall]:
    up = SimUpcall(kernel.endpoint)
    yield up
    up.close()




class Consumer:
    """Records the done callback of a kernel-sim request."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def done(self, _data: object, status: int, peerid: int) -> None:
        self.calls.append((status, peerid))


def submit(kernel: Kernel, sock: socket.socket, consumer: Consumer, **kw: object) -> None:
    args = TLSHandshakeArgs(sock=sock, done=consumer.done, **kw)  # type: ignore[arg-type]
    assert kernel.tls_client_hello_anon(args) == 0


def readable(fd: int, timeout: float = WAIT_S) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_sim_upcall_resolves_the_family_and_its_group(agent: SimUpcall) -> None:
    assert agent.family.name == "handshake"
    assert "tlshd" in agent.family.mcast_groups


def test_sim_upcall_joins_the_tlshd_group(kernel: Kernel, ns: NetNS) -> None:
    assert kernel.listeners(ns) == 0

    up = SimUpcall(kernel.endpoint)

    try:
        assert kernel.listeners(ns) == 1
    finally:
        up.close()


def test_closing_the_upcall_leaves_the_group(
    kernel: Kernel, ns: NetNS, agent: SimUpcall
) -> None:
    agent.close()

    assert kernel.wait_for(lambda: kernel.listeners(ns) == 0, WAIT_S)


def test_accept_with_nothing_pending_returns_none(agent: SimUpcall) -> None:
    before = open_fds()

    assert agent.accept() is None
    assert open_fds() == before


def test_drain_with_nothing_queued_returns_zero(agent: SimUpcall) -> None:
    assert agent.drain_notifications() == 0


def test_ready_wakes_the_notify_fd_and_is_counted(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    assert not readable(agent.notify_fileno(), 0)

    submit(kernel, tcp[0], Consumer())

    assert readable(agent.notify_fileno())
    assert agent.drain_notifications() == 1
    assert not readable(agent.notify_fileno(), 0)


def test_accept_brings_the_consumers_socket_into_this_process(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer(), peername="server.test", timeout_ms=1234)
    before = open_fds()

    reply = agent.accept()

    assert reply is not None
    try:
        assert reply.sockfd not in before
        assert reply.sockfd != tcp[0].fileno()
        assert cookie(reply.sockfd) == cookie(tcp[0].fileno())
        assert fcntl.fcntl(reply.sockfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert (reply.message_type, reply.auth_mode) == (MsgType.CLIENTHELLO, AuthMode.UNAUTH)
        assert (reply.peername, reply.timeout_ms) == ("server.test", 1234)
        assert reply.unknown_attrs == ()
    finally:
        os.close(reply.sockfd)


def test_second_accept_after_the_only_request_returns_none(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer())
    reply = agent.accept()
    assert reply is not None
    os.close(reply.sockfd)

    assert agent.accept() is None


def test_done_completes_the_consumers_request(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    consumer = Consumer()
    submit(kernel, tcp[0], consumer)
    reply = agent.accept()
    assert reply is not None

    agent.done(reply.sockfd, errno.EACCES, ())
    os.close(reply.sockfd)

    assert kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EACCES, 0)]


def test_done_carries_the_first_remote_auth_serial(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    consumer = Consumer()
    submit(kernel, tcp[0], consumer)
    reply = agent.accept()
    assert reply is not None

    agent.done(reply.sockfd, 0, (4242, 7))
    os.close(reply.sockfd)

    assert kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(0, 4242)]


def test_done_on_a_socket_without_a_request_raises_ebusy(
    agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    with pytest.raises(NetlinkError) as caught:
        agent.done(tcp[1].fileno(), 0, ())

    assert caught.value.errno == errno.EBUSY


def test_done_on_a_closed_fd_raises_ebadf(agent: SimUpcall, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)

    with pytest.raises(NetlinkError) as caught:
        agent.done(fd, 0, ())

    assert caught.value.errno == errno.EBADF


def test_setsockopt_installs_the_ulp_and_rejects_a_bad_crypto_info(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer())
    reply = agent.accept()
    assert reply is not None
    try:
        agent.setsockopt(reply.sockfd, SOL_TCP, TCP_ULP, TLS_ULP_NAME)

        with pytest.raises(OSError) as caught:
            agent.setsockopt(reply.sockfd, SOL_TLS, TLS_TX, b"\x04\x03\x33\x00" + bytes(10))

        assert caught.value.errno == errno.EINVAL
    finally:
        os.close(reply.sockfd)


def test_a_socket_unknown_to_the_simulator_takes_the_ulp_as_on_linux_and_nothing_else(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    with pytest.raises(OSError) as caught:
        agent.setsockopt(tcp[1].fileno(), SOL_TLS, TLS_TX, bytes(40))
    assert caught.value.errno == errno.EBADF  # no ULP: the simulator does not know it

    agent.setsockopt(tcp[1].fileno(), SOL_TCP, TCP_ULP, TLS_ULP_NAME)  # adopted, like Linux
    cookie = int.from_bytes(tcp[1].getsockopt(socket.SOL_SOCKET, 57, 8), "little")
    assert cookie in kernel.adopted_on_ulp
    assert kernel.ktls(kernel.socket_of(cookie)) is not None
    with pytest.raises(OSError) as again:
        agent.setsockopt(tcp[1].fileno(), SOL_TCP, TCP_ULP, TLS_ULP_NAME)
    assert again.value.errno == errno.EEXIST



def test_setsockopts_sends_the_batch_at_once_and_names_the_first_step_that_failed(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer())
    reply = agent.accept()
    assert reply is not None
    bad = b"\x04\x03\x33\x00" + bytes(10)
    try:
        with pytest.raises(BatchSockoptError) as caught:
            agent.setsockopts(reply.sockfd, [(SOL_TCP, TCP_ULP, TLS_ULP_NAME),
                                             (SOL_TLS, TLS_TX, bad), (SOL_TLS, TLS_RX, bad)])

        assert (caught.value.index, caught.value.error.errno) == (1, errno.EINVAL)
        # every ack was read: the next request's answer is its own
        with pytest.raises(OSError) as again:
            agent.setsockopt(reply.sockfd, SOL_TCP, TCP_ULP, TLS_ULP_NAME)
        assert again.value.errno == errno.EEXIST
    finally:
        os.close(reply.sockfd)


BROKEN_MODES = [m for m in MALFORMED_MODES if m not in ("unknown_attrs", "no_fd")]


@pytest.mark.parametrize("mode", BROKEN_MODES)
def test_malformed_accept_reply_salvages_the_fd_for_done(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket], mode: str
) -> None:
    consumer = Consumer()
    submit(kernel, tcp[0], consumer)
    kernel.faults.arm_malformed_accept(mode)
    before = open_fds()

    with pytest.raises(BrokenAcceptError) as caught:
        agent.accept()

    broken = caught.value
    assert broken.sockfd is not None
    assert cookie(broken.sockfd) == cookie(tcp[0].fileno())
    assert broken.error.status == errno.EINVAL
    agent.done(broken.sockfd, broken.error.status, ())
    os.close(broken.sockfd)
    assert open_fds() == before
    assert kernel.wait_for(lambda: bool(consumer.calls), WAIT_S)
    assert consumer.calls == [(-errno.EINVAL, 0)]


def test_malformed_accept_reply_without_an_fd_has_none_and_leaks_nothing(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer())
    kernel.faults.arm_malformed_accept("no_fd")
    before = open_fds()

    with pytest.raises(BrokenAcceptError) as caught:
        agent.accept()

    assert caught.value.sockfd is None
    assert open_fds() == before


def test_accept_reply_with_unknown_attributes_decodes(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    submit(kernel, tcp[0], Consumer())
    kernel.faults.arm_malformed_accept("unknown_attrs")
    before = open_fds()

    reply = agent.accept()

    assert reply is not None
    assert reply.unknown_attrs == (10, 11)
    assert cookie(reply.sockfd) == cookie(tcp[0].fileno())
    os.close(reply.sockfd)
    assert open_fds() == before


def test_every_malformed_mode_is_covered() -> None:
    covered = {*BROKEN_MODES, "no_fd", "unknown_attrs"}

    assert covered == set(MALFORMED_MODES)


def test_accept_after_a_broken_reply_still_works(
    kernel: Kernel, agent: SimUpcall, tcp: tuple[socket.socket, socket.socket]
) -> None:
    kernel.faults.arm_malformed_accept("bad_attr_len")
    submit(kernel, tcp[0], Consumer())
    with pytest.raises(BrokenAcceptError) as caught:
        agent.accept()
    assert caught.value.sockfd is not None
    os.close(caught.value.sockfd)
    second = tcp[1]  # the other end is a connected TCP socket too
    submit(kernel, second, Consumer())

    reply = agent.accept()

    assert reply is not None
    assert cookie(reply.sockfd) == cookie(second.fileno())
    os.close(reply.sockfd)


def _port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[0])


def test_only_the_kernel_can_send_to_the_agent_s_netlink_sockets() -> None:
    """Another process's forged reply (an ACCEPT naming an fd we hold, an empty datagram) is
    refused by the kernel: the agent's sockets are connected to port 0."""
    from tlshd import upcall

    agent = upcall._netlink_socket()
    plain = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    plain.bind((0, 0))
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    try:
        forged = struct.pack("=IHHII", 16, 0x22, 0, 1, 0)
        with pytest.raises(ConnectionRefusedError):
            forger.sendto(forged, (_port_of(agent), 0))
        forger.sendto(forged, (_port_of(plain), 0))  # an unconnected socket would take it
        plain.settimeout(WAIT_S)
        assert plain.recv(64) == forged
        # the kernel still answers: nlctrl's reply to a family lookup
        from tlshd.netlink import codec

        agent.send(codec.encode_get_family("nlctrl", 7))
        agent.settimeout(WAIT_S)
        assert agent.recv(65536)[:4] != b""
    finally:
        for sock in (agent, plain, forger):
            sock.close()


def test_the_early_listener_is_connected_to_the_kernel_too(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from tlshd import early

    connected: list[object] = []
    real = early.socket.socket

    class Spy(real):  # type: ignore[misc, valid-type]
        def connect(self, address: object) -> None:
            connected.append(address)
            super().connect(address)

    monkeypatch.setattr(early.socket, "socket", Spy)
    with contextlib.suppress(ValueError):  # no handshake family on this host
        early._hold_netlink()
    assert connected == [(0, 0)]


def test_an_empty_kernel_sim_message_is_not_the_end_of_the_connection() -> None:
    from tlshd.upcall import seqpacket_closed

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        theirs.send(b"")
        assert ours.recv(64) == b"" and not seqpacket_closed(ours)  # an empty message
        theirs.close()
        assert ours.recv(64) == b"" and seqpacket_closed(ours)  # the end


def test_an_empty_notification_leaves_the_agent_serving(agent: SimUpcall) -> None:
    """The worker used to die on it ("notification socket closed by the kernel side")."""
    real = agent._notify
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    agent._notify = ours  # a notification connection whose other end we control
    try:
        theirs.send(b"")
        assert agent.drain_notifications() == 0
        theirs.close()
        with pytest.raises(TransportError, match="closed"):
            agent.drain_notifications()
    finally:
        agent._notify = real
        ours.close()
