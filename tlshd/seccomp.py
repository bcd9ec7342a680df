"""Seccomp user notification: a supervisor performs a process's connect() and accept().

The edge of ``tlshd wrap`` (:mod:`tlshd.wrap`) that talks to the kernel. A filter installed
in the child before exec turns connect, accept and accept4 into notifications on a listener
fd (``SECCOMP_FILTER_FLAG_NEW_LISTENER``, Linux 5.0); every other syscall runs as usual. The
supervisor reads a notification, takes a copy of the caller's socket (``pidfd_getfd``, 5.6),
does the work on that copy (the same open file description: a connect on it connects the
caller's socket), and answers: with a return value, an errno, "run the syscall as it is"
(``SECCOMP_USER_NOTIF_FLAG_CONTINUE``, 5.5), or, for accept, a new fd installed in the caller
as the syscall's result (``SECCOMP_IOCTL_NOTIF_ADDFD`` with ``SECCOMP_ADDFD_FLAG_SEND``,
5.14). With ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`` (5.19) a caller whose notification was
read waits for the answer through signals, so a handshake is never torn in half by SIGCHLD
or SIGALRM; before 5.19 the filter goes without it.

Every number here is from linux/seccomp.h, linux/filter.h and linux/audit.h.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
PR_SET_NO_NEW_PRIVS = 38
# _IOWR('!', 0, struct seccomp_notif[80]), _IOWR('!', 1, struct seccomp_notif_resp[24]),
# _IOW('!', 2, __u64), _IOW('!', 3, struct seccomp_notif_addfd[24])
NOTIF_RECV, NOTIF_SEND, NOTIF_ID_VALID, NOTIF_ADDFD = 0xC0502100, 0xC0182101, 0x40082102, \
    0x40182103
# struct seccomp_notif: id, pid, flags, then struct seccomp_data: nr, arch, ip, args[6]
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")  # id, val, error, flags
_ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags
_BPF = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
OFFSET_NR, OFFSET_ARCH = 0, 4  # in struct seccomp_data
X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class Arch:
    audit: int  # AUDIT_ARCH_*
    connect: int
    accept: int
    accept4: int
    seccomp: int
    pidfd_getfd: int
    x32: bool = False


ARCHES = {
    "x86_64": Arch(0xC000003E, connect=42, accept=43, accept4=288, seccomp=317,
                   pidfd_getfd=438, x32=True),
    "aarch64": Arch(0xC00000B7, connect=203, accept=202, accept4=242, seccomp=277,
                    pidfd_getfd=438),
}


class UnsupportedError(OSError):
    """This machine cannot run the mechanism: the architecture, or the kernel is too old."""


def arch() -> Arch:
    machine = platform.machine()
    if machine not in ARCHES:
        raise UnsupportedError(errno.ENOSYS, f"tlshd wrap supports {', '.join(ARCHES)}, "
                                        f"not {machine}")
    return ARCHES[machine]


def syscall_numbers(a: Arch) -> dict[int, str]:
    """The intercepted syscalls by number (x32's too, where the ABI exists)."""
    numbers = {a.connect: "connect", a.accept: "accept", a.accept4: "accept4"}
    if a.x32:
        numbers.update({nr | X32_SYSCALL_BIT: name for nr, name in list(numbers.items())})
    return numbers


def filter_program(a: Arch) -> bytes:
    """The BPF program: the intercepted syscalls of this architecture notify, all else runs.

    A syscall of another architecture's ABI (a 32-bit program's socketcall) runs as it is:
    ``tlshd wrap`` secures 64-bit programs' sockets (docs/applications.md)."""
    numbers = sorted(syscall_numbers(a))
    n = len(numbers)
    prog = [_BPF.pack(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
            _BPF.pack(BPF_JEQ_K, 1, 0, a.audit),
            _BPF.pack(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
            _BPF.pack(BPF_LD_W_ABS, 0, 0, OFFSET_NR)]
    # instruction 4 + i jumps, when equal, over the rest of the comparisons and the ALLOW
    prog += [_BPF.pack(BPF_JEQ_K, n - i, 0, nr) for i, nr in enumerate(numbers)]
    prog += [_BPF.pack(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
             _BPF.pack(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def install_filter(a: Arch) -> int:
    """In the child, before exec: no new privileges, the filter, and its listener fd."""
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    program = ctypes.create_string_buffer(filter_program(a))
    fprog = _SockFprog(len(program.raw) // _BPF.size, ctypes.addressof(program))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    for attempt in (flags, SECCOMP_FILTER_FLAG_NEW_LISTENER):
        fd = libc.syscall(a.seccomp, SECCOMP_SET_MODE_FILTER, attempt, ctypes.byref(fprog))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EINVAL or attempt != flags:  # EINVAL: before 5.19, retry without
            raise UnsupportedError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # the calling thread's id
    nr: int
    arch: int
    args: tuple[int, ...]


def receive(listener: int) -> Notification:
    """The next notification (blocks; ENOENT when its caller went away meanwhile)."""
    buf = bytearray(_NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, NOTIF_RECV, buf, True)
    fields = _NOTIF.unpack(bytes(buf))
    return Notification(id=fields[0], pid=fields[1], nr=fields[3], arch=fields[4],
                        args=tuple(fields[6:12]))


def respond(listener: int, notif_id: int, value: int = 0, error: int = 0) -> None:
    """The syscall returns ``value``, or fails with ``error`` (a positive errno)."""
    fcntl.ioctl(listener, NOTIF_SEND, bytearray(_RESP.pack(notif_id, value, -error, 0)), True)


def proceed(listener: int, notif_id: int) -> None:
    """The syscall runs as it is (the supervisor has nothing to do with this one)."""
    fcntl.ioctl(listener, NOTIF_SEND,
                bytearray(_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)), True)


def still_waiting(listener: int, notif_id: int) -> bool:
    """The caller is still in the syscall (not killed, not interrupted)."""
    try:
        fcntl.ioctl(listener, NOTIF_ID_VALID, struct.pack("=Q", notif_id))
    except OSError:
        return False
    return True


def send_fd(listener: int, notif_id: int, fd: int, *, cloexec: bool) -> int:
    """Install ``fd`` in the caller and make it the syscall's result; its number there."""
    flags = os.O_CLOEXEC if cloexec else 0
    # a mutable buffer makes fcntl.ioctl return the ioctl's own result: the new fd's number
    request = bytearray(_ADDFD.pack(notif_id, SECCOMP_ADDFD_FLAG_SEND, fd, 0, flags))
    return int(fcntl.ioctl(listener, NOTIF_ADDFD, request, True))


def get_fd(a: Arch, pidfd: int, target_fd: int) -> int:
    """A copy (O_CLOEXEC) of a file descriptor of the process that ``pidfd`` refers to."""
    libc = _libc()
    fd = libc.syscall(a.pidfd_getfd, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return int(fd)


class Memory:
    """The caller's memory through /proc/TID/mem (ptrace access: our own descendant)."""

    def __init__(self, tid: int) -> None:
        self.fd = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self.fd, size, address)
        if len(data) != size:
            raise OSError(errno.EFAULT, "a short read of the caller's memory")
        return data

    def write(self, address: int, data: bytes) -> None:
        if os.pwrite(self.fd, data, address) != len(data):
            raise OSError(errno.EFAULT, "a short write to the caller's memory")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
