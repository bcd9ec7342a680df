"""Network namespaces: which one a socket lives in, and making sockets inside one.

``setns(2)`` with CLONE_NEWNET changes only the calling thread, and a socket
keeps the namespace it was created in. So to create a socket (a listening
endpoint, a consumer's TCP socket) inside ``/run/netns/NAME`` the simulator
runs the creation in a short-lived thread that first enters the namespace.
``ioctl(SIOCGSKNS)`` returns a namespace fd for any socket: its inode number
identifies the namespace, which is how a request is queued "on the namespace
of the consumer's socket" (``sock_net(sk)``).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C
NETNS_RUN_DIR = Path("/run/netns")

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str | None) -> Path:
    """None is this process's own namespace."""
    return Path("/proc/self/ns/net") if name is None else NETNS_RUN_DIR / name


def netns_inode(name: str | None) -> int:
    return os.stat(netns_path(name)).st_ino


def socket_netns_inode(sock: socket.socket | int) -> int:
    """Inode of the namespace a socket belongs to (SIOCGSKNS)."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    nsfd = fcntl.ioctl(fd, SIOCGSKNS)
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread inside namespace ``name`` and return its result."""
    if name is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            _setns(netns_path(name))
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def socket_in_netns(
    name: str | None, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM
) -> socket.socket:
    return run_in_netns(name, lambda: socket.socket(family, type_))
