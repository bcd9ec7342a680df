"""What a handshake process gives up before it reads a byte from a peer.

``confine(user)`` runs once, in the process that will parse untrusted TLS (``tlshd.agent.privsep``):

1. it leaves the agent's session keyring for an anonymous one of its own, so it no longer
   *possesses* the keys linked there (possession, not the uid, is what grants a process the
   kernel consumers' keys);
2. it becomes ``user`` (``[agent] worker_user``, by default ``nobody``): supplementary groups
   dropped, then real, effective and saved gid and uid. Leaving uid 0 clears every
   capability, so it can no longer reach the handshake family (GENL_ADMIN_PERM), read root's
   0600 key files, or act for another request;
3. ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE`` 0: no exec can give anything back, and
   no other process of that user can trace it;
4. a seccomp filter (x86-64; elsewhere the steps above only, and the log says so) that
   answers EPERM to the system calls it has no use for: sockets other than AF_UNIX (no
   netlink, no new TCP or raw socket), the keyring calls, exec, ptrace and cross-process
   memory access, io_uring (which would carry calls past the filter), namespaces, mounts,
   modules, BPF, perf, and the clock and identity calls. Calls of another ABI (x32, i386)
   are refused too.

It then checks ``/proc/self/status`` (CapEff 0, NoNewPrivs 1, Seccomp 2) and raises
``SandboxError`` if anything did not take: a handshake process never runs half confined.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import pwd
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tlshd import keyring
from tlshd.errors import LocalError, TlshdError

log = logging.getLogger("tlshd")

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AF_UNIX = 1

# BPF (linux/filter.h, linux/seccomp.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG0 = 0, 4, 16
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86-64 numbers (asm/unistd_64.h; tests/unit/agent/test_sandbox.py checks them against the header)
X86_64_SOCKET = 41
X86_64_DENIED: dict[str, int] = {
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "execve": 59, "execveat": 322,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_getfd": 438, "process_madvise": 440,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "setns": 308, "unshare": 272, "mount": 165, "umount2": 166, "pivot_root": 155,
    "chroot": 161, "mount_setattr": 442, "move_mount": 429, "open_tree": 428, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
    "quotactl": 179, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "fanotify_init": 300, "ioperm": 173, "iopl": 172,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117,
    "setresgid": 119, "setgroups": 116, "setfsuid": 122, "setfsgid": 123, "capset": 126,
}


class SandboxError(LocalError):
    """The handshake process could not give up its privileges: it must not serve."""

    status = errno.EPERM


@dataclass(frozen=True)
class WorkerUser:
    name: str
    uid: int
    gid: int


def resolve_user(name: str) -> WorkerUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(f"[agent] worker_user: no user {name!r} on this system") from None
    if entry.pw_uid == 0:
        raise SandboxError(f"[agent] worker_user: {name!r} is root, which gives up nothing")
    return WorkerUser(name, entry.pw_uid, entry.pw_gid)


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program(errno_value: int = errno.EPERM) -> bytes:
    """The x86-64 filter: native ABI only, the denied calls refused, socket() for AF_UNIX."""
    deny = _insn(_RET_K, RET_ERRNO | errno_value)
    prog = [_insn(_LD_W_ABS, _ARCH), _insn(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0), deny,
            _insn(_LD_W_ABS, _NR), _insn(_JGE_K, X32_SYSCALL_BIT, 0, 1), deny]
    for nr in sorted(set(X86_64_DENIED.values())):
        prog += [_insn(_JEQ_K, nr, 0, 1), deny]
    prog += [_insn(_JEQ_K, X86_64_SOCKET, 1, 0), _insn(_RET_K, RET_ALLOW),
             _insn(_LD_W_ABS, _ARG0), _insn(_JEQ_K, AF_UNIX, 0, 1), _insn(_RET_K, RET_ALLOW),
             deny]
    return b"".join(prog)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(option: int, arg: int | ctypes.c_void_p | object = 0) -> None:
    value = arg if not isinstance(arg, int) else ctypes.c_ulong(arg)
    if _libc().prctl(ctypes.c_int(option), value, ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)) != 0:
        raise SandboxError(f"prctl({option}): {os.strerror(ctypes.get_errno())}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_filter(program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc().prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                     ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise SandboxError(f"seccomp filter refused: {os.strerror(ctypes.get_errno())}")


def status_fields(pid: int | str = "self") -> dict[str, str]:
    """CapEff, NoNewPrivs, Seccomp, Uid, ... from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def confine(user: WorkerUser) -> None:
    """Steps 1-4 of the module's description, then the check; SandboxError on any failure."""
    try:
        keyring.join_anonymous_session_keyring()
    except TlshdError as exc:
        raise SandboxError(f"a session keyring of its own: {exc}") from None
    try:
        if os.getgroups():  # none under systemd, where setgroups is @privileged: not called
            os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    except OSError as exc:
        raise SandboxError(f"cannot become {user.name!r}: {exc.strerror} (the agent needs "
                           "CAP_SETUID and CAP_SETGID to separate its handshake processes)"
                           ) from None
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)
    if platform.machine() == "x86_64":
        _install_filter(seccomp_program())
    else:
        log.warning("no seccomp filter for %s: handshake processes run without one",
                    platform.machine())
    _check(user, seccomp=platform.machine() == "x86_64")


def _check(user: WorkerUser, *, seccomp: bool) -> None:
    fields = status_fields()
    problems = []
    if int(fields.get("CapEff", "1"), 16) != 0:
        problems.append(f"CapEff {fields.get('CapEff')}")
    if fields.get("NoNewPrivs") != "1":
        problems.append("NoNewPrivs is not 1")
    if seccomp and fields.get("Seccomp") != "2":
        problems.append(f"Seccomp {fields.get('Seccomp')}")
    if os.getuid() != user.uid or os.geteuid() != user.uid:
        problems.append("uid unchanged")
    if problems:
        raise SandboxError("handshake process not confined: " + ", ".join(problems))
