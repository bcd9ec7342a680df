"""``tlshd wrap``'s pure parts: the seccomp filter (run by a small BPF interpreter, as the
kernel would run it), socket addresses as the kernel lays them out, the wrap policy, and the
application request's ``for_pid``."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from tlshd import seccomp
from tlshd.appserver import RequestError, _fields, _same_uid
from tlshd.policy import Facts, parse_policy_texts
from tlshd.wrap import choose, format_sockaddr, parse_sockaddr


def run_bpf(program: bytes, nr: int, arch: int) -> int:
    """classic BPF over struct seccomp_data: only what the filter uses (LD W ABS, JEQ K,
    RET K), and anything else is a failure of the filter."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *([0] * 6))
    insns = [struct.unpack_from("=HBBI", program, at) for at in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == seccomp.BPF_LD_W_ABS:
            (acc,) = struct.unpack_from("=I", data, k)
            pc += 1
        elif code == seccomp.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"instruction {code:#x}")
    raise AssertionError("ran off the end")


@pytest.mark.parametrize("machine", sorted(seccomp.ARCHES))
def test_the_filter_notifies_connect_and_accept_and_allows_the_rest(machine: str) -> None:
    a = seccomp.ARCHES[machine]
    program = seccomp.filter_program(a)
    for nr in (a.connect, a.accept, a.accept4):
        assert run_bpf(program, nr, a.audit) == seccomp.SECCOMP_RET_USER_NOTIF
    for nr in (0, 1, 41, 44, 45, 46, 47, 201, 204, 435, 437, 439):  # read, socket, sendto...
        if nr not in seccomp.syscall_numbers(a):
            assert run_bpf(program, nr, a.audit) == seccomp.SECCOMP_RET_ALLOW, nr
    assert run_bpf(program, a.connect, 0x40000003) == seccomp.SECCOMP_RET_ALLOW  # i386
    if a.x32:
        x32 = a.connect | seccomp.X32_SYSCALL_BIT
        assert run_bpf(program, x32, a.audit) == seccomp.SECCOMP_RET_USER_NOTIF


def test_the_ioctl_numbers_are_linux_seccomp_h() -> None:
    def ioc(direction: int, nr: int, size: int) -> int:
        return direction << 30 | size << 16 | ord("!") << 8 | nr

    assert ioc(3, 0, 80) == seccomp.NOTIF_RECV
    assert ioc(3, 1, 24) == seccomp.NOTIF_SEND
    assert ioc(1, 2, 8) == seccomp.NOTIF_ID_VALID
    assert ioc(1, 3, 24) == seccomp.NOTIF_ADDFD


@pytest.mark.parametrize("address", [
    (socket.AF_INET, ("192.0.2.7", 443)),
    (socket.AF_INET6, ("2001:db8::1", 8443, 5, 0)),
    (socket.AF_INET6, ("fe80::1", 22, 0, 3)),
])
def test_socket_addresses_round_trip_as_the_kernel_lays_them_out(
        address: tuple[int, tuple[object, ...]]) -> None:
    family, where = address
    raw = format_sockaddr(family, where)
    assert len(raw) == (16 if family == socket.AF_INET else 28)
    assert parse_sockaddr(raw) == where
    assert parse_sockaddr(raw + b"\0" * 100) == where  # sockaddr_storage-sized


def test_other_families_and_short_addresses_are_not_the_wraps() -> None:
    assert parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + b"/run/x\0") is None
    assert parse_sockaddr(struct.pack("=H", socket.AF_UNSPEC) + b"\0" * 14) is None
    assert parse_sockaddr(struct.pack("=H", socket.AF_INET) + b"\0" * 4) is None
    assert parse_sockaddr(b"") is None


def test_the_wrap_policy_picks_tls_or_plain_by_the_first_matching_rule() -> None:
    policy = parse_policy_texts([("wrap.yml", (
        "rules:\n"
        "  web:\n    priority: 10\n    match: {direction: outbound, remote_ports: ['443']}\n"
        "  lab:\n    priority: 20\n    match: {remote: [10.9.0.0/16]}\n"
        "    action: {tls: false}\n"))], Path("/x"))
    assert not policy.problems
    out = Facts("outbound", 0, remote=("192.0.2.1", 443))
    assert choose(policy, out).secure and choose(policy, out).why == "rule web"
    assert not choose(policy, Facts("outbound", 0, remote=("10.9.1.1", 443))).secure
    assert choose(policy, Facts("outbound", 0, remote=("192.0.2.1", 80))).why == \
        "no rule matches"
    assert choose(None, out).secure


def test_for_pid_must_be_a_process_of_the_senders_uid() -> None:
    assert _fields(b'{"v": 1, "role": "client", "for_pid": 12}')[3] == 12
    for bad in (b'"x"', b"true", b"0", b"-3", b"99999999"):
        with pytest.raises(RequestError) as info:
            _fields(b'{"v": 1, "role": "client", "for_pid": ' + bad + b"}")
        assert info.value.status == errno.EINVAL
    assert _same_uid(os.getpid(), os.getuid()) == os.getpid()
    with pytest.raises(RequestError) as info:
        _same_uid(os.getpid(), os.getuid() + 1)
    assert info.value.status == errno.EACCES
    with pytest.raises(RequestError) as info:
        _same_uid(1 << 22 + 1, 0)
    assert info.value.status == errno.ESRCH
