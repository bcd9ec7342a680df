"""Reaching into an agent process the way the kernel does: its fds and capabilities.

The kernel resolves DONE's SOCKFD (and the fd of a setsockopt) in the *sender's*
fd table (``sockfd_lookup``). The simulator learns the sender's pid from
SCM_CREDENTIALS (SO_PASSCRED, filled in by the kernel for every message) and
duplicates the named fd with ``pidfd_getfd(2)`` (Linux 5.6; needs ptrace
access to the sender: root, or same uid with Yama ptrace_scope 0).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
CAP_NET_ADMIN = 12

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: int) -> int:
    ret = int(_libc.syscall(nr, *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def get_peer_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of fd ``fd`` of process ``pid`` (O_CLOEXEC)."""
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    pidfd = _syscall(SYS_pidfd_open, pid, 0)
    try:
        return _syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def has_capability(pid: int, cap: int = CAP_NET_ADMIN) -> bool:
    """Effective capability set of ``pid`` from /proc (``netlink_capable``'s question)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False
