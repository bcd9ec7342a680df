"""kernel-sim's runtime behaves like net/handshake, seen from a raw agent's bytes.

Every test boots its own ``Kernel`` on a unique endpoint, drives it with
``RawAgent`` (netlink bytes built by hand, no tlshd), and checks what an agent
and a kernel consumer would observe on Linux. The kernel source each rule comes
from is named in the test or in docs/kernel-sim.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import rawagent as ra
from rawagent import KEY_A, KEY_B, DoneRecorder, RawAgent

from kernel_sim import genl
from kernel_sim.consumer import wait_handshake
from kernel_sim.handshake.tlshd import TLSHandshakeArgs
from kernel_sim.kernel import Kernel, sock_cookie
from kernel_sim.netns import socket_in_netns
from kernel_sim.profile import LINUX_6_12, LINUX_6_12_117, LINUX_7_3, MAINLINE, KernelProfile

# include/uapi/linux/handshake.h
A_SOCKFD, A_MESSAGE_TYPE, A_TIMEOUT, A_AUTH_MODE = 1, 3, 4, 5
A_PEER_IDENTITY, A_CERTIFICATE, A_PEERNAME, A_KEYRING = 6, 7, 8, 9
CLIENTHELLO, SERVERHELLO = 1, 2
AUTH_UNAUTH, AUTH_PSK, AUTH_X509 = 1, 2, 3


# Fixtures shared by the kernel-sim test files (defined in rawagent; no_leaks is autouse).
no_leaks, endpoint, stack, boot, kernel = ra.no_leaks, ra.endpoint, ra.stack, ra.boot, ra.kernel
connect, agent, pair, fds, accepted = ra.connect, ra.agent, ra.pair, ra.fds, ra.accepted


# --- family resolution (nlctrl, net/netlink/genetlink.c ctrl_getfamily) ---------------


def test_getfamily_by_name_returns_id_version_1_and_groups_none_then_tlshd(
        kernel: Kernel, connect: Callable[..., RawAgent]) -> None:
    agent = connect(join=False)

    reply = agent.get_family("handshake")

    assert reply.error is None and reply.cmd == genl.CTRL_CMD_NEWFAMILY
    assert agent.family_id == struct.unpack("=H", reply.all(genl.CTRL_ATTR_FAMILY_ID)[0])[0]
    assert agent.version == 1
    assert list(agent.groups) == ["none", "tlshd"]


def test_getfamily_of_an_unknown_name_is_enoent(kernel: Kernel, agent: RawAgent) -> None:
    reply = agent.get_family("no-such-family")

    assert reply.error == -errno.ENOENT


# --- submit (handshake_req_submit) --------------------------------------------------


def test_submit_with_no_agent_in_the_namespace_is_esrch(kernel: Kernel, pair: Any) -> None:
    sock, _peer = pair()

    rc, done = ra.submit(kernel, sock)

    assert rc == -errno.ESRCH and not done.calls


def test_submit_with_an_agent_that_has_not_joined_tlshd_is_esrch(
        kernel: Kernel, connect: Callable[..., RawAgent], pair: Any) -> None:
    connect(join=False)
    sock, _peer = pair()

    rc, _done = ra.submit(kernel, sock)

    assert rc == -errno.ESRCH


def test_submit_after_join_queues_and_multicasts_a_byte_exact_ready(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()

    rc, _done = ra.submit(kernel, sock)
    ready = agent.read_ready()

    assert rc == 0 and ready is not None
    # nlmsghdr(len 28, family, flags 0, seq 0, portid 0) genlmsghdr(READY, version 1)
    # nlattr(len 8, HANDLER_CLASS) u32 1 -- handshake_genl_notify
    assert ready.raw == struct.pack("=IHHII", 28, agent.family_id, 0, 0, 0) + \
        bytes([1, 1, 0, 0]) + struct.pack("=HHI", 8, 2, 1)


def test_submit_over_the_pending_cap_is_eagain(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any) -> None:
    kernel = boot(pending_max=3)
    connect()
    results = [ra.submit(kernel, pair()[0])[0] for _ in range(3)]

    rc, _done = ra.submit(kernel, pair()[0])

    assert results == [0, 0, 0] and rc == -errno.EAGAIN


def test_second_request_on_one_socket_is_ebusy(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()
    assert ra.submit(kernel, sock)[0] == 0

    rc, done = ra.submit(kernel, sock, "server_hello_x509")

    assert rc == -errno.EBUSY and not done.calls


@pytest.mark.parametrize(("peerids", "expected"), [((), -errno.EINVAL),
                                                     (tuple(range(1, 7)), -errno.EINVAL),
                                                     (tuple(range(1, 6)), 0)])
def test_psk_client_hello_needs_one_to_five_peer_ids(
        kernel: Kernel, agent: RawAgent, pair: Any, peerids: tuple[int, ...],
        expected: int) -> None:
    sock, _peer = pair()

    rc, _done = ra.submit(kernel, sock, "client_hello_psk", my_peerids=peerids)

    assert rc == expected


# --- ACCEPT (handshake_nl_accept_doit, tls_handshake_accept) --------------------------


def test_accept_hands_out_requests_in_fifo_order(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    socks = [pair()[0] for _ in range(3)]
    for sock in socks:
        assert ra.submit(kernel, sock)[0] == 0

    cookies = [ra.fd_cookie(fds(agent.accept())) for _ in socks]

    assert cookies == [sock_cookie(s) for s in socks]


def test_accept_with_nothing_pending_is_eagain(kernel: Kernel, agent: RawAgent) -> None:
    reply = agent.accept()

    assert reply.error == -errno.EAGAIN and not reply.fds


def test_accept_without_handler_class_is_einval(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    ra.submit(kernel, pair()[0])

    reply = agent.accept(handler_class=None)

    assert reply.error == -errno.EINVAL and not reply.fds


def test_accept_reply_header_echoes_seq_and_port_and_the_fd_is_the_consumers_socket(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, _peer = pair()
    ra.submit(kernel, sock)

    reply = agent.accept()

    assert reply.header.type == agent.family_id and reply.cmd == ra.CMD_ACCEPT
    assert reply.header.flags == 0 and reply.header.seq > 0 and reply.header.pid >= 1000
    assert ra.fd_cookie(fds(reply)) == sock_cookie(sock)


def test_accept_reply_of_a_plain_anon_request_is_sockfd_type_auth_only(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    ra.submit(kernel, pair()[0])

    reply = agent.accept()
    fds(reply)

    assert reply.types() == [A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE]
    assert reply.u32(A_MESSAGE_TYPE) == CLIENTHELLO and reply.u32(A_AUTH_MODE) == AUTH_UNAUTH


@pytest.mark.parametrize(("profile", "expected"), [
    (MAINLINE, [A_SOCKFD, A_MESSAGE_TYPE, A_PEERNAME, A_TIMEOUT, A_KEYRING, A_AUTH_MODE]),
    (LINUX_6_12, [A_SOCKFD, A_MESSAGE_TYPE, A_PEERNAME, A_TIMEOUT, A_AUTH_MODE]),
], ids=["mainline", "6.12"])
def test_accept_reply_optional_attributes_come_in_kernel_order_when_set(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any, fds: Any,
        profile: KernelProfile, expected: list[int]) -> None:
    kernel = boot(profile)
    agent = connect()
    ra.submit(kernel, pair()[0], peername="nfs.example", timeout_ms=7000, keyring=0x1234)

    reply = agent.accept()
    fds(reply)

    assert reply.types() == expected
    assert reply.all(A_PEERNAME) == [b"nfs.example\0"]
    assert reply.u32(A_TIMEOUT) == 7000
    if profile is MAINLINE:
        assert reply.u32(A_KEYRING) == 0x1234


def test_accept_reply_of_a_psk_client_request_repeats_peer_identity(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    ra.submit(kernel, pair()[0], "client_hello_psk", my_peerids=(11, 22, 33))

    reply = agent.accept()
    fds(reply)

    assert reply.types() == [A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE] + [A_PEER_IDENTITY] * 3
    assert [genl.get_u32(p) for p in reply.all(A_PEER_IDENTITY)] == [11, 22, 33]
    assert reply.u32(A_AUTH_MODE) == AUTH_PSK


def test_accept_reply_of_a_psk_server_request_has_one_peer_identity(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    ra.submit(kernel, pair()[0], "server_hello_psk")

    reply = agent.accept()
    fds(reply)

    assert reply.u32(A_MESSAGE_TYPE) == SERVERHELLO
    assert [genl.get_u32(p) for p in reply.all(A_PEER_IDENTITY)] == [0]


def test_accept_reply_certificate_is_a_flagged_nest_only_for_x509_with_serials(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    ra.submit(kernel, pair()[0], "client_hello_x509", my_cert=101, my_privkey=202)
    ra.submit(kernel, pair()[0], "client_hello_x509")
    ra.submit(kernel, pair()[0], "client_hello_anon", my_cert=101, my_privkey=202)

    with_serials, without, anon = (agent.accept() for _ in range(3))
    for reply in (with_serials, without, anon):
        fds(reply)

    assert with_serials.types() == [A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE, A_CERTIFICATE]
    _t, raw_type, nest = with_serials.attrs[-1]
    assert raw_type == A_CERTIFICATE | genl.NLA_F_NESTED
    assert nest == struct.pack("=HHIHHI", 8, 1, 101, 8, 2, 202)
    assert without.types() == anon.types() == [A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE]


# --- capabilities (GENL_ADMIN_PERM on ACCEPT, and on DONE but in 6.12.95) ----------------


def _unprivileged(*argv: str, pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run ``rawagent.py argv`` without CAP_NET_ADMIN; its JSON answer."""
    if shutil.which("setpriv"):
        drop = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
                "--bounding-set=-net_admin", "--"]
    elif shutil.which("capsh"):
        drop = ["capsh", "--drop=cap_net_admin", "--"]
    else:
        pytest.skip("neither setpriv nor capsh is installed")
    out = subprocess.run([*drop, sys.executable, ra.__file__, *argv], check=True,
                         capture_output=True, text=True, timeout=30, pass_fds=pass_fds)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_accept_from_an_agent_without_cap_net_admin_is_eperm(
        kernel: Kernel, agent: RawAgent, endpoint: str, pair: Any, fds: Any) -> None:
    ra.submit(kernel, pair()[0])
    assert kernel.enforce_caps

    result = _unprivileged("accept", endpoint)

    assert result["errno"] == -errno.EPERM
    assert fds(agent.accept())  # the request is still there for a privileged agent


@pytest.mark.parametrize(("profile", "expected"), [
    (MAINLINE, -errno.EPERM), (LINUX_7_3, -errno.EPERM), (LINUX_6_12_117, -errno.EPERM),
    (LINUX_6_12, 0),
], ids=["mainline", "7.3", "6.12.117", "6.12.95"])
def test_done_needs_cap_net_admin_except_on_6_12_95(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any, fds: Any,
        endpoint: str, profile: KernelProfile, expected: int) -> None:
    kernel = boot(profile)
    agent = connect()
    _rc, done = ra.submit(kernel, pair()[0])
    fd = fds(agent.accept())

    result = _unprivileged("done", endpoint, str(fd), "0", pass_fds=(fd,))

    assert result["errno"] == expected
    if expected:
        assert not done.calls
        assert agent.done(fd, 0) == 0  # the request is still there for a privileged agent
    assert done.wait()[1] == 0


# --- DONE (handshake_nl_done_doit, tls_handshake_done) --------------------------------


def test_done_with_an_fd_the_sender_does_not_hold_is_ebadf(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()
    unused = os.dup(fd)
    os.close(unused)

    assert agent.done(unused, 0) == -errno.EBADF
    assert agent.done(-1, 0) == -errno.EBADF
    assert not done.calls


def test_done_on_a_socket_without_a_request_is_ebusy(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()

    assert agent.done(sock.fileno(), 0) == -errno.EBUSY


def test_done_without_sockfd_is_einval(kernel: Kernel, agent: RawAgent) -> None:
    assert agent.done(None, 0) == -errno.EINVAL


def test_done_with_an_attribute_above_maxattr_is_einval(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()
    session_tag = genl.nla_string(4, "tag")  # proposed DONE attribute 4: not in mainline

    rc = agent.done(None, attrs=genl.nla_u32(1, 0) + genl.nla_s32(2, fd) + session_tag)

    assert rc == -errno.EINVAL and not done.calls


def test_done_completes_exactly_once(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()

    first = agent.done(fd, 0, (7,))
    second = agent.done(fd, errno.EACCES, (8,))

    assert (first, second) == (0, 0)
    assert done.wait() == (None, 0, 7) and len(done.calls) == 1


@pytest.mark.parametrize(("profile", "expected_rc", "expected_status"), [
    (MAINLINE, -errno.EINVAL, None),
    (LINUX_6_12, 0, -4096),
], ids=["mainline", "6.12"])
def test_done_status_above_max_errno_is_einval_only_where_capped(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any, fds: Any,
        profile: KernelProfile, expected_rc: int, expected_status: int | None) -> None:
    kernel = boot(profile)
    agent = connect()
    _rc, done = ra.submit(kernel, pair()[0])
    fd = fds(agent.accept())

    assert agent.done(fd, 4096) == expected_rc
    if expected_status is None:
        assert not done.calls
    else:
        assert done.wait()[1] == expected_status


@pytest.mark.parametrize(("profile", "expected"), [(MAINLINE, -errno.EIO),
                                                   (LINUX_6_12, errno.EIO)],
                         ids=["mainline", "6.12-legacy-sign"])
def test_done_without_status_reaches_the_consumer_as_eio_with_the_profiles_sign(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any, fds: Any,
        profile: KernelProfile, expected: int) -> None:
    kernel = boot(profile)
    agent = connect()
    _rc, done = ra.submit(kernel, pair()[0])
    fd = fds(agent.accept())

    assert agent.done(fd, None) == 0

    assert done.wait()[1] == expected


def test_only_the_first_remote_auth_reaches_the_consumer(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()

    assert agent.done(fd, 0, (41, 42, 43, 44, 45, 46)) == 0

    assert done.wait() == (None, 0, 41)


def test_consumer_sees_the_negated_wire_status_and_no_peer_id_by_default(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted(data="ctx")

    assert agent.done(fd, errno.EKEYREJECTED) == 0

    assert done.wait() == ("ctx", -errno.EKEYREJECTED, 0)


def test_successful_done_without_nlm_f_ack_sends_nothing(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()
    attrs = genl.nla_u32(ra.A_DONE_STATUS, 0) + genl.nla_s32(ra.A_DONE_SOCKFD, fd)

    agent.cmd.send(genl.genlmsg(agent.family_id, ra.CMD_DONE, 0, attrs, seq=77,
                                flags=genl.NLM_F_REQUEST))

    done.wait()
    assert agent.cmd.recv(timeout=0.3) is None


# --- cancel (tls_handshake_cancel, handshake_req_cancel) ------------------------------


def test_cancel_of_a_pending_request_removes_it_without_a_callback(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()
    _rc, done = ra.submit(kernel, sock)

    cancelled = kernel.tls_handshake_cancel(sock)

    assert cancelled
    assert agent.accept().error == -errno.EAGAIN
    assert not done.calls


def test_timeout_on_an_accepted_request_is_etimedout_and_the_agents_fd_keeps_the_connection(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, peer = pair()
    args = TLSHandshakeArgs(sock=sock, done=DoneRecorder())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(wait_handshake, kernel, sock, kernel.tls_client_hello_anon,
                              args, 0.5)
        assert agent.read_ready() is not None
        fd = fds(agent.accept())
        outcome = waiting.result(timeout=5)

    assert outcome.status == -errno.ETIMEDOUT
    assert agent.done(fd, 0) == 0  # accepted, but it changes nothing now
    kernel.sock_release(sock)  # the consumer gives up its socket
    os.write(fd, b"still here")
    assert peer.recv(64) == b"still here"
    os.close(fd)
    assert peer.recv(64) == b""  # the agent's close was the last reference


def test_done_after_cancel_has_no_effect(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    sock, _peer, fd, done = accepted()
    assert kernel.tls_handshake_cancel(sock)

    rc = agent.done(fd, 0, (5,))

    assert rc == 0
    time.sleep(0.1)
    assert not done.calls
    assert not kernel.tls_handshake_cancel(sock)  # already completed


# --- network namespaces ---------------------------------------------------------------


@pytest.fixture
def two_namespaces(kernel: Kernel, stack: contextlib.ExitStack) -> tuple[str, str]:
    names = (stack.enter_context(ra.temp_netns()), stack.enter_context(ra.temp_netns()))
    for name in names:
        kernel.add_netns(name)
    return names


def test_a_request_is_seen_only_by_the_agent_of_its_sockets_namespace(
        kernel: Kernel, two_namespaces: tuple[str, str], connect: Callable[..., RawAgent],
        stack: contextlib.ExitStack, fds: Any) -> None:
    ns_a, ns_b = two_namespaces
    agent_a, agent_b = connect(ns_a), connect(ns_b)
    sock = stack.enter_context(socket_in_netns(ns_a))

    rc, _done = ra.submit(kernel, sock)

    assert rc == 0
    assert agent_b.read_ready(timeout=0.3) is None
    assert agent_b.accept().error == -errno.EAGAIN
    assert agent_a.read_ready() is not None
    assert ra.fd_cookie(fds(agent_a.accept())) == sock_cookie(sock)


def test_submit_in_a_namespace_whose_agent_is_elsewhere_is_esrch(
        kernel: Kernel, two_namespaces: tuple[str, str], agent: RawAgent,
        stack: contextlib.ExitStack) -> None:
    sock = stack.enter_context(socket_in_netns(two_namespaces[0]))

    rc, _done = ra.submit(kernel, sock)

    assert rc == -errno.ESRCH


@pytest.mark.parametrize(("profile", "expected"), [(MAINLINE, [-errno.ETIMEDOUT]),
                                                   (LINUX_6_12, [])],
                         ids=["mainline", "6.12-splice-bug"])
def test_namespace_exit_completes_pending_requests_and_cuts_its_agents(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent],
        stack: contextlib.ExitStack, profile: KernelProfile, expected: list[int]) -> None:
    kernel = boot(profile)
    name = stack.enter_context(ra.temp_netns())
    kernel.add_netns(name)
    agent = connect(name)
    sock = stack.enter_context(socket_in_netns(name))
    _rc, done = ra.submit(kernel, sock)
    assert agent.read_ready() is not None

    kernel.remove_netns(name)

    time.sleep(0.1)
    assert [status for _data, status, _peer in done.calls] == expected
    with pytest.raises(EOFError):
        agent.notify.recv(timeout=2)
    with pytest.raises(EOFError):
        agent.cmd.recv(timeout=2)


# --- the agent's setsockopt (KSIM_CMD_SETSOCKOPT) -------------------------------------


def test_agent_installs_ktls_and_the_consumer_sees_tx_and_rx_configured(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    sock, peer, fd, _done = accepted()

    ra.install_ktls(agent, fd, tx=KEY_A, rx=KEY_B)

    ktls = kernel.ktls(sock)
    assert ktls.version == ra.TLS_1_3_VERSION
    assert (ktls.tx_record_seq, ktls.rx_record_seq) == (0, 0)
    ktls.sendmsg(b"ping")
    assert KEY_A.open(0, ra.recv_record(peer)) == (ra.APPLICATION_DATA, b"ping")
    peer.sendall(KEY_B.seal(0, b"pong"))
    assert ktls.recvmsg(64) == (ra.APPLICATION_DATA, b"pong")


def test_setsockopt_with_a_bad_crypto_info_length_is_einval(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, _done = accepted()
    assert agent.setsockopt(fd, ra.SOL_TCP, ra.TCP_ULP, b"tls\0") == 0

    rc = agent.setsockopt(fd, ra.SOL_TLS, ra.TLS_TX, KEY_A.crypto_info() + b"\0")

    assert rc == -errno.EINVAL


def test_a_socket_under_no_handshake_takes_the_ulp_as_on_linux_and_tls_options_are_ebadf(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()

    assert agent.setsockopt(sock.fileno(), ra.SOL_TLS, ra.TLS_TX, KEY_A.crypto_info()) == \
        -errno.EBADF  # no ULP yet: unknown to the model
    assert agent.setsockopt(sock.fileno(), ra.SOL_TCP, ra.TCP_ULP, b"tls\0") == 0  # adopted


def test_setsockopt_on_a_non_socket_fd_is_enotsock_and_the_kernel_survives(
        kernel: Kernel, connect: Callable[..., RawAgent]) -> None:
    agent = connect(timeout=1.0)
    before = set(os.listdir("/proc/self/fd"))  # stdout may be a pipe: leave it alone
    read_end, write_end = os.pipe()
    try:
        rc = agent.setsockopt(read_end, ra.SOL_TCP, ra.TCP_ULP, b"tls\0")
    finally:
        os.close(read_end)
        os.close(write_end)
        _close_leaked_dups(before)

    assert rc == -errno.ENOTSOCK
    assert agent.accept().error == -errno.EAGAIN


def _close_leaked_dups(before: set[str]) -> None:
    """The failing path above leaks a pipe dup in this process; keep the leak check honest
    (only pipes that were not open before: pytest's own output may go to one)."""
    for fd in set(os.listdir("/proc/self/fd")) - before:
        if ra.fd_target(fd).startswith("pipe:"):
            ra.close_quiet(int(fd))


# --- trace events (the handshake:* tracepoints) ----------------------------------------


def test_trace_records_submit_accept_and_completion_in_order_with_monotonic_times(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    sock, _peer, fd, done = accepted()
    agent.done(fd, 0)
    done.wait()

    names = ("submit", "cmd_accept", "cmd_done", "complete")
    events = {name: kernel.events(name) for name in names}

    assert all(len(found) == 1 for found in events.values()), events
    cookie = sock_cookie(sock)
    assert events["submit"][0].sock == events["cmd_accept"][0].sock == cookie
    assert events["complete"][0].sock == cookie
    assert events["submit"][0].ts <= events["cmd_accept"][0].ts <= events["complete"][0].ts
    times = [e.ts for e in kernel.trace]
    assert times == sorted(times)


def test_trace_cmd_done_comes_before_complete(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    _sock, _peer, fd, done = accepted()
    agent.done(fd, 0)
    done.wait()

    order = [e.event for e in kernel.trace if e.event in ("cmd_done", "complete")]

    assert order == ["cmd_done", "complete"]


def test_trace_records_a_cancel(kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()
    ra.submit(kernel, sock)

    kernel.tls_handshake_cancel(sock)

    (event,) = kernel.events("cancel")
    assert event.sock == sock_cookie(sock) and event.ts >= kernel.events("submit")[0].ts
