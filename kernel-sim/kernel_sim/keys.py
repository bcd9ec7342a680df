"""Real Linux keyrings for kernel-sim: ``add_key(2)`` and ``keyctl(2)`` through ``syscall(2)``.

Theory of operation
-------------------
Kernel consumers hand the agent key *serials* (certificates, private keys,
PSKs, a keyring) and the agent reads the keys behind them from the kernel's
key store. kernel-sim keeps those keys in the host kernel's real keyrings, so
an agent reads them with its own keyctl calls exactly as on Linux. This module
is kernel-sim's own, minimal access to them (it never imports tlshd): raw
syscalls through libc, numbers from ``asm/unistd_64.h`` / asm-generic and
operations from ``include/uapi/linux/keyctl.h``. Every failure raises the
``OSError`` the syscall failed with (ENOKEY, EKEYREVOKED, EACCES, ...), so
callers see the errno Linux gives.

Permissions (``security/keys/permission.c``): a key grants its *possessor*
bits when it is reachable from the caller's thread, process or session
keyrings through searchable keyrings; otherwise the user, group or other bits
apply. Root has no override. ``KEYCTL_READ`` on a key without READ fails with
EACCES unless the caller possesses it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

# include/uapi/linux/keyctl.h
KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_REVOKE = 3
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_INVALIDATE = 21

# include/linux/key.h permission bits (possessor, user, group, other)
KEY_POS_VIEW, KEY_POS_READ, KEY_POS_WRITE = 0x01000000, 0x02000000, 0x04000000
KEY_POS_SEARCH, KEY_POS_LINK, KEY_POS_SETATTR = 0x08000000, 0x10000000, 0x20000000
KEY_POS_ALL = 0x3F000000
KEY_USR_VIEW, KEY_USR_READ, KEY_USR_WRITE = 0x00010000, 0x00020000, 0x00040000
KEY_USR_SEARCH, KEY_USR_LINK, KEY_USR_SETATTR = 0x00080000, 0x00100000, 0x00200000
KEY_USR_ALL = 0x003F0000

_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219), "arm64": (217, 219)}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _numbers() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"add_key/keyctl numbers unknown for {machine}")
    return _SYSCALLS[machine]


def _syscall(nr: int, *args: object) -> int:
    ret = int(_libc.syscall(ctypes.c_long(nr), *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _long(value: int) -> ctypes.c_long:
    return ctypes.c_long(value)


def _keyctl(op: int, *args: object) -> int:
    padded = list(args) + [_long(0)] * (4 - len(args))
    return _syscall(_numbers()[1], _long(op), *padded)


def _c_string(text: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(text.encode())


# --- creating ------------------------------------------------------------------------


def add_key(key_type: str, description: str, payload: bytes | None, keyring: int) -> int:
    """``add_key(2)``: create (or update) a key in ``keyring``; returns its serial."""
    buf = None if payload is None else ctypes.create_string_buffer(payload, len(payload))
    size = 0 if payload is None else len(payload)
    return _syscall(_numbers()[0], _c_string(key_type), _c_string(description), buf,
                    ctypes.c_size_t(size), _long(keyring))


def new_keyring(name: str, dest: int) -> int:
    """A new keyring named ``name`` linked into ``dest``. Names starting with '.' are
    reserved for the kernel: add_key refuses them with EPERM."""
    return add_key("keyring", name, None, dest)


def get_keyring_id(spec: int, *, create: bool = False) -> int:
    """``KEYCTL_GET_KEYRING_ID``: the serial behind a ``KEY_SPEC_*`` value."""
    return _keyctl(KEYCTL_GET_KEYRING_ID, _long(spec), _long(int(create)))


# --- reading -------------------------------------------------------------------------


def _read_sized(op: int, serial: int) -> bytes:
    """READ and DESCRIBE return the full length: size with a NULL buffer, then read."""
    size = _keyctl(op, _long(serial), None, _long(0))
    while True:
        buf = ctypes.create_string_buffer(max(size, 1))
        needed = _keyctl(op, _long(serial), buf, _long(size))
        if needed <= size:
            return buf.raw[:needed]
        size = needed  # the key grew in between


def read_key(serial: int) -> bytes:
    """``KEYCTL_READ``: the payload (for a keyring, its members as int32 serials)."""
    return _read_sized(KEYCTL_READ, serial)


@dataclass(frozen=True)
class KeyDescription:
    """``KEYCTL_DESCRIBE``: ``"%s;%d;%d;%08x;%s"`` (type;uid;gid;perm;description)."""

    type: str
    uid: int
    gid: int
    perm: int
    description: str


def describe_key(serial: int) -> KeyDescription:
    raw = _read_sized(KEYCTL_DESCRIBE, serial).rstrip(b"\0").decode()
    key_type, uid, gid, perm, description = raw.split(";", 4)
    return KeyDescription(key_type, int(uid), int(gid), int(perm, 16), description)


def keyring_members(keyring: int) -> list[int]:
    """The serials linked directly into ``keyring``, in the keyring's own order."""
    data = read_key(keyring)
    return list(struct.unpack(f"={len(data) // 4}i", data[: len(data) // 4 * 4]))


def search(keyring: int, key_type: str, description: str, dest: int = 0) -> int:
    """``KEYCTL_SEARCH``: exact description match, recursive; ENOKEY if none."""
    return _keyctl(KEYCTL_SEARCH, _long(keyring), _c_string(key_type), _c_string(description),
                   _long(dest))


# --- changing ------------------------------------------------------------------------


def revoke(serial: int) -> None:
    """``KEYCTL_REVOKE``: later reads fail with EKEYREVOKED."""
    _keyctl(KEYCTL_REVOKE, _long(serial))


def invalidate(serial: int) -> None:
    """``KEYCTL_INVALIDATE``: the key is unlinked everywhere and collected."""
    _keyctl(KEYCTL_INVALIDATE, _long(serial))


def set_perm(serial: int, perm: int) -> None:
    _keyctl(KEYCTL_SETPERM, _long(serial), _long(perm))


def link(serial: int, keyring: int) -> None:
    """``KEYCTL_LINK``: needs LINK on the key and WRITE on the keyring."""
    _keyctl(KEYCTL_LINK, _long(serial), _long(keyring))


def unlink(serial: int, keyring: int) -> None:
    _keyctl(KEYCTL_UNLINK, _long(serial), _long(keyring))


def clear(keyring: int) -> None:
    _keyctl(KEYCTL_CLEAR, _long(keyring))
