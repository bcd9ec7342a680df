"""Fault injection: the rare things a real kernel does, on demand.

A test arms a fault by count (the next N events are affected); the kernel
consults the plan at the matching point. Thread-safe: tests arm faults from
their own thread while the kernel's loop consumes them.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

# How an ACCEPT reply can be broken (what a buggy or hostile kernel might send).
MALFORMED_MODES = (
    "truncated",  # nlmsg_len claims more than was sent
    "bad_attr_len",  # an attribute length runs past the message
    "missing_sockfd",  # no SOCKFD attribute
    "missing_auth_mode",  # no AUTH_MODE attribute
    "unknown_attrs",  # attributes 10 and 11 (proposed KeyUpdate/tags): must be tolerated
    "no_fd",  # the reply carries no SCM_RIGHTS fd
)


@dataclass
class Faults:
    drop_ready: int = 0
    duplicate_ready: int = 0
    delay_ready_s: float = 0.0
    malformed_accept: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take_drop_ready(self) -> bool:
        return self._take("drop_ready")

    def take_duplicate_ready(self) -> bool:
        return self._take("duplicate_ready")

    def take_malformed_accept(self) -> str | None:
        with self._lock:
            return self.malformed_accept.pop(0) if self.malformed_accept else None

    def arm_malformed_accept(self, mode: str, count: int = 1) -> None:
        if mode not in MALFORMED_MODES:
            raise ValueError(f"unknown malformed-ACCEPT mode {mode!r}; one of {MALFORMED_MODES}")
        with self._lock:
            self.malformed_accept.extend([mode] * count)

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False


def malform_accept(reply: bytes, mode: str) -> bytes:
    """Break a well-formed ACCEPT reply the way ``mode`` says."""
    hdr_len = 20  # nlmsghdr + genlmsghdr; attributes follow
    head, attrs = bytearray(reply[:hdr_len]), _attr_list(reply[hdr_len:])
    if mode == "truncated":
        return bytes(reply[: len(reply) - 4])
    if mode == "bad_attr_len":
        attr_type = struct.unpack_from("=H", attrs[-1], 2)[0]
        attrs[-1] = struct.pack("=HH", 0xFF0, attr_type) + attrs[-1][4:]
    elif mode in ("missing_sockfd", "missing_auth_mode"):
        drop = 1 if mode == "missing_sockfd" else 5
        attrs = [a for a in attrs if struct.unpack_from("=HH", a)[1] & 0x3FFF != drop]
    elif mode == "unknown_attrs":
        attrs += [struct.pack("=HHI", 8, 10, 1), struct.pack("=HHI", 8, 11, 7)]
    body = b"".join(attrs)
    struct.pack_into("=I", head, 0, hdr_len + len(body))
    return bytes(head) + body


def _attr_list(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset + 4 <= len(data):
        length = struct.unpack_from("=H", data, offset)[0]
        padded = (length + 3) & ~3
        out.append(data[offset : offset + padded])
        offset += padded
    return out
