"""kernel-sim's fault injection (kernel_sim/faults.py): each fault does exactly what it says.

The faults are rare kernel behaviours an agent must survive: a READY lost,
doubled or late, a broken ACCEPT reply, a consumer that goes away, a namespace
that exits in the middle of a handshake. Each test arms one fault and checks
the bytes or events the raw agent sees.
"""

from __future__ import annotations

import contextlib
import errno
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import rawagent as ra
from rawagent import RawAgent

from kernel_sim.faults import MALFORMED_MODES, Faults
from kernel_sim.kernel import Kernel, sock_cookie
from kernel_sim.netns import socket_in_netns

# Fixtures shared by the kernel-sim test files (defined in rawagent; no_leaks is autouse).
no_leaks, endpoint, stack, boot, kernel = ra.no_leaks, ra.endpoint, ra.stack, ra.boot, ra.kernel
connect, agent, pair, fds, accepted = ra.connect, ra.agent, ra.pair, ra.fds, ra.accepted

A_SOCKFD, A_MESSAGE_TYPE, A_AUTH_MODE = 1, 3, 5


def expected_accept(agent: RawAgent, reply: ra.Reply, sock_fd: int) -> bytes:
    """The well-formed reply to an anon client request, built by hand (tls_handshake_accept)."""
    attrs = struct.pack("=HHI", 8, A_SOCKFD, sock_fd) + struct.pack("=HHI", 8, A_MESSAGE_TYPE, 1)
    attrs += struct.pack("=HHI", 8, A_AUTH_MODE, 1)
    body = bytes([ra.CMD_ACCEPT, 1, 0, 0]) + attrs
    header = struct.pack("=IHHII", 16 + len(body), agent.family_id, 0, reply.header.seq,
                         reply.header.pid)
    return header + body


def arm_and_accept(kernel: Kernel, agent: RawAgent, pair: Any, mode: str) -> tuple[Any, ra.Reply]:
    sock, _peer = pair()
    assert ra.submit(kernel, sock)[0] == 0
    kernel.faults.arm_malformed_accept(mode)
    return sock, agent.accept()


# --- READY faults ---------------------------------------------------------------------


def test_dropped_ready_reaches_no_agent_but_an_accept_sweep_finds_the_request(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any,
        fds: Any) -> None:
    kernel = boot(faults=Faults(drop_ready=1))
    agent = connect()
    sock, _peer = pair()

    rc, _done = ra.submit(kernel, sock)

    assert rc == 0  # the consumer cannot tell
    assert agent.read_ready(timeout=0.3) is None
    assert kernel.events("ready_dropped")
    assert ra.fd_cookie(fds(agent.accept())) == sock_cookie(sock)


def test_duplicated_ready_arrives_twice_for_one_request(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any,
        fds: Any) -> None:
    kernel = boot(faults=Faults(duplicate_ready=1))
    agent = connect()
    ra.submit(kernel, pair()[0])

    first, second = agent.read_ready(), agent.read_ready()

    assert first is not None and second is not None and first.raw == second.raw
    fds(agent.accept())
    assert agent.accept().error == -errno.EAGAIN
    assert agent.read_ready(timeout=0.2) is None  # the fault fired once only


def test_delayed_ready_arrives_late_while_submit_returns_at_once(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any) -> None:
    kernel = boot(faults=Faults(delay_ready_s=0.4))
    agent = connect()
    start = time.monotonic()

    rc, _done = ra.submit(kernel, pair()[0])
    submitted = time.monotonic() - start

    assert rc == 0 and submitted < 0.2
    assert agent.read_ready(timeout=0.1) is None
    assert agent.read_ready(timeout=2.0) is not None
    assert time.monotonic() - start >= 0.4


# --- malformed ACCEPT replies ---------------------------------------------------------


def test_every_documented_malformed_mode_is_tested() -> None:
    assert set(MALFORMED_MODES) == {"truncated", "bad_attr_len", "missing_sockfd",
                                    "missing_auth_mode", "unknown_attrs", "no_fd"}


def test_unknown_malformed_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown malformed-ACCEPT mode"):
        Faults().arm_malformed_accept("garbled")


def test_truncated_accept_claims_four_bytes_more_than_were_sent(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, reply = arm_and_accept(kernel, agent, pair, "truncated")
    fds(reply)

    good = expected_accept(agent, reply, sock.fileno())
    assert reply.raw == good[:-4]
    assert reply.header.length == len(good) == len(reply.raw) + 4


def test_bad_attr_len_makes_the_last_attribute_run_past_the_message(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, reply = arm_and_accept(kernel, agent, pair, "bad_attr_len")
    fds(reply)

    good = expected_accept(agent, reply, sock.fileno())
    last = len(good) - 8
    assert reply.raw[:last] == good[:last] and reply.raw[last + 4:] == good[last + 4:]
    assert struct.unpack_from("=H", reply.raw, last)[0] == 0xFF0 > len(reply.raw) - last
    assert reply.header.length == len(reply.raw)
    assert reply.types() == [A_SOCKFD, A_MESSAGE_TYPE]  # a careful parser stops there


def test_bad_attr_len_changes_only_the_length_of_the_last_attribute(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, reply = arm_and_accept(kernel, agent, pair, "bad_attr_len")
    fds(reply)

    good = expected_accept(agent, reply, sock.fileno())
    last = len(good) - 8
    assert reply.raw == good[:last] + struct.pack("=HH", 0xFF0, A_AUTH_MODE) + good[last + 4:]


@pytest.mark.parametrize(("mode", "left"), [("missing_sockfd", [A_MESSAGE_TYPE, A_AUTH_MODE]),
                                            ("missing_auth_mode", [A_SOCKFD, A_MESSAGE_TYPE])])
def test_missing_attribute_modes_drop_exactly_that_attribute(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any, mode: str,
        left: list[int]) -> None:
    _sock, reply = arm_and_accept(kernel, agent, pair, mode)

    fds(reply)  # the fd still comes

    assert reply.types() == left
    assert reply.header.length == len(reply.raw) == 20 + 8 * len(left)


def test_unknown_attrs_appends_proposed_attributes_10_and_11(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    sock, reply = arm_and_accept(kernel, agent, pair, "unknown_attrs")
    fds(reply)

    good = expected_accept(agent, reply, sock.fileno())
    extra = struct.pack("=HHI", 8, 10, 1) + struct.pack("=HHI", 8, 11, 7)
    assert reply.raw == struct.pack("=I", len(good) + 16) + good[4:] + extra


def test_no_fd_sends_a_well_formed_reply_without_scm_rights(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, reply = arm_and_accept(kernel, agent, pair, "no_fd")

    assert reply.fds == []
    assert reply.raw == expected_accept(agent, reply, sock.fileno())


def test_a_malformed_reply_is_armed_once_and_the_next_accept_is_clean(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any) -> None:
    _sock, broken = arm_and_accept(kernel, agent, pair, "missing_sockfd")
    fds(broken)
    sock, _peer = pair()
    ra.submit(kernel, sock)

    clean = agent.accept()

    assert ra.fd_cookie(fds(clean)) == sock_cookie(sock)
    assert clean.raw == expected_accept(agent, clean, sock.fileno())


# --- the consumer or the namespace goes away mid-handshake ----------------------------


def test_consumer_releasing_its_socket_destroys_the_request_and_a_later_done_is_ebusy(
        kernel: Kernel, agent: RawAgent, accepted: Callable[..., Any]) -> None:
    sock, _peer, fd, done = accepted()
    cookie = sock_cookie(sock)

    kernel.sock_release(sock)

    assert [e.sock for e in kernel.events("destruct")] == [cookie]
    assert agent.done(fd, 0) == -errno.EBUSY
    assert not done.calls


def test_consumer_releasing_a_pending_request_takes_it_off_the_queue(
        kernel: Kernel, agent: RawAgent, pair: Any) -> None:
    sock, _peer = pair()
    _rc, done = ra.submit(kernel, sock)

    kernel.sock_release(sock)

    assert agent.accept().error == -errno.EAGAIN
    assert not done.calls


def test_namespace_exit_mid_handshake_completes_only_pending_requests_and_cuts_the_agent(
        kernel: Kernel, connect: Callable[..., RawAgent], stack: contextlib.ExitStack,
        fds: Any) -> None:
    name = stack.enter_context(ra.temp_netns())
    kernel.add_netns(name)
    agent = connect(name)
    in_progress = stack.enter_context(socket_in_netns(name))
    pending = stack.enter_context(socket_in_netns(name))
    _rc, in_progress_done = ra.submit(kernel, in_progress)
    _rc, pending_done = ra.submit(kernel, pending)
    fds(agent.accept())

    kernel.remove_netns(name)

    assert pending_done.wait()[1] == -errno.ETIMEDOUT
    assert not in_progress_done.calls  # accepted requests wait for the consumer's timeout
    with pytest.raises(EOFError):
        while agent.cmd.recv(timeout=2) is not None:
            pass
    assert kernel.tls_handshake_cancel(in_progress)  # the consumer's own timeout still wins
    assert ra.submit(kernel, stack.enter_context(socket_in_netns(name)))[0] == -errno.EOPNOTSUPP

