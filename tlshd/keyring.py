"""Kernel keyrings through libkeyutils (``libkeyutils.so.1``), via ctypes.

Why ctypes on the C library: the PyPI ``keyutils`` 0.6 sdist does not build on
Python 3.11, and binding the handful of functions we need in ABI mode needs
no compiler, no build step and no new dependency beyond Debian's
``libkeyutils1`` (already a dependency of ``keyutils``). Errors become the
errno-carrying classes of ``tlshd.errors``, so the DONE status follows from
them: ENOKEY, EKEYREVOKED, EKEYEXPIRED -> ENOKEY-family, EACCES.

Payloads are returned as bytes and never logged; descriptions are public.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from functools import cache

from tlshd.errors import CredentialError, KeyAccessError, KeyNotFoundError, KeyRevokedError

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
# The keyrings the kernel consumers create and search (nvme-keyring.ko, NFS client and server):
# linked into the agent's session keyring at start when they exist (tlshd/agent/supervisor.py).
KERNEL_KEYRINGS = (".nvme", ".nfs", ".nfsd")


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("keyutils") or "libkeyutils.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.add_key.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_int32]
    lib.add_key.restype = ctypes.c_int32
    lib.keyctl_read.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
    lib.keyctl_read.restype = ctypes.c_long
    lib.keyctl_describe.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
    lib.keyctl_describe.restype = ctypes.c_long
    lib.keyctl_search.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
    lib.keyctl_search.restype = ctypes.c_long
    for fn in ("keyctl_link", "keyctl_unlink"):
        getattr(lib, fn).argtypes = [ctypes.c_int32, ctypes.c_int32]
        getattr(lib, fn).restype = ctypes.c_long
    lib.keyctl_set_timeout.argtypes = [ctypes.c_int32, ctypes.c_uint]
    lib.keyctl_set_timeout.restype = ctypes.c_long
    lib.keyctl_revoke.argtypes = [ctypes.c_int32]
    lib.keyctl_revoke.restype = ctypes.c_long
    lib.keyctl_get_keyring_ID.argtypes = [ctypes.c_int32, ctypes.c_int]
    lib.keyctl_get_keyring_ID.restype = ctypes.c_int32
    lib.keyctl_join_session_keyring.argtypes = [ctypes.c_char_p]
    lib.keyctl_join_session_keyring.restype = ctypes.c_int32
    return lib


def _check(ret: int, what: str) -> int:
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    raise _error(err, f"{what}: {os.strerror(err)}")


def _error(err: int, message: str) -> CredentialError:
    if err in (errno.ENOKEY, errno.ENOENT):
        return KeyNotFoundError(message)
    if err in (errno.EKEYREVOKED, errno.EKEYEXPIRED):
        return KeyRevokedError(message, status=err)
    if err in (errno.EACCES, errno.EPERM):
        return KeyAccessError(message)
    return CredentialError(message, status=err if 0 < err <= 4095 else errno.ENOKEY)


@dataclass(frozen=True)
class KeyDescription:
    """``KEYCTL_DESCRIBE``: "type;uid;gid;perm;description"."""

    serial: int
    key_type: str
    uid: int
    gid: int
    perm: int
    description: str


def describe_key(serial: int) -> KeyDescription:
    lib = _lib()
    size = _check(lib.keyctl_describe(serial, None, 0), f"describe key {serial}")
    buf = ctypes.create_string_buffer(max(size, 1))
    size = _check(lib.keyctl_describe(serial, buf, len(buf)), f"describe key {serial}")
    text = buf.raw[: min(size, len(buf))].rstrip(b"\0").decode("utf-8", "replace")
    parts = text.split(";", 4)
    if len(parts) != 5:
        raise CredentialError(f"key {serial}: unexpected description format")
    key_type, uid, gid, perm, description = parts
    return KeyDescription(serial, key_type, int(uid), int(gid), int(perm, 16), description)


def read_key(serial: int) -> bytes:
    """The payload of key ``serial`` (sized first, then read)."""
    lib = _lib()
    size = _check(lib.keyctl_read(serial, None, 0), f"read key {serial}")
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _check(lib.keyctl_read(serial, buf, size), f"read key {serial}")
    return buf.raw[: min(got, size)]


def add_key(key_type: str, description: str, payload: bytes, keyring: int) -> int:
    lib = _lib()
    ret = lib.add_key(key_type.encode(), description.encode(), payload, len(payload), keyring)
    return _check(ret, f"add {key_type} key {description!r}")


def search_key(keyring: int, key_type: str, description: str) -> int:
    ret = _lib().keyctl_search(keyring, key_type.encode(), description.encode(), 0)
    return _check(ret, f"search {key_type} key {description!r}")


def link_key(key: int, keyring: int) -> None:
    _check(_lib().keyctl_link(key, keyring), f"link key {key} into {keyring}")


def unlink_key(key: int, keyring: int) -> None:
    _check(_lib().keyctl_unlink(key, keyring), f"unlink key {key} from {keyring}")


def set_key_timeout(key: int, seconds: int) -> None:
    _check(_lib().keyctl_set_timeout(key, seconds), f"set timeout on key {key}")


def revoke_key(key: int) -> None:
    _check(_lib().keyctl_revoke(key), f"revoke key {key}")


def keyring_id(special: int, *, create: bool = False) -> int:
    return _check(_lib().keyctl_get_keyring_ID(special, int(create)), f"keyring {special}")


def find_keyring(name: str) -> int:
    """A keyring by name (libkeyutils ``find_key_by_type_and_desc``, via /proc/keys)."""
    lib = _lib()
    fn = lib.find_key_by_type_and_desc
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
    fn.restype = ctypes.c_int32
    return _check(fn(b"keyring", name.encode(), 0), f"find keyring {name!r}")


def join_anonymous_session_keyring() -> int:
    """Leave the session keyring for a new, empty, anonymous one (tlshd.agent.sandbox)."""
    return _check(_lib().keyctl_join_session_keyring(None), "join a new session keyring")
