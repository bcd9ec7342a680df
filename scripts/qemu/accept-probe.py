"""Guest-side probe: ACCEPT handshake requests by hand and print the raw reply attributes.

    python accept-probe.py READYFILE STATUS SECONDS [drop-admin]

Joins the `handshake` family's `tlshd` group (stdlib only, independent of tlshd's codec), then
for SECONDS answers every request: prints each ACCEPT reply attribute in wire order as
`PROBE attr=<type>:<len>:<value>`, then sends DONE with STATUS and prints the kernel's answer.
Used by guest.sh to settle the reply's attribute order and content on a real kernel.
It writes READYFILE once it has joined the group. With ``drop-admin`` it removes
CAP_NET_ADMIN from its effective set after each ACCEPT (which needs it) and before the DONE, to
see whether the kernel requires the capability for DONE too.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import sys
import time

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
CMD_READY, CMD_ACCEPT, CMD_DONE = 1, 2, 3
ACCEPT_NAMES = {
    1: "SOCKFD",
    2: "HANDLER_CLASS",
    3: "MESSAGE_TYPE",
    4: "TIMEOUT",
    5: "AUTH_MODE",
    6: "PEER_IDENTITY",
    7: "CERTIFICATE",
    8: "PEERNAME",
    9: "KEYRING",
}


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out.append((kind, data[pos + 4 : pos + length]))
        pos += (length + 3) & ~3
    return out


def messages(data: bytes) -> list[tuple[int, bytes]]:
    return [(kind, body) for kind, _, body in framed(data)]


def framed(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos + 16 <= len(data):
        length, kind, _, seq = struct.unpack_from("=IHHI", data, pos)
        out.append((kind, seq, data[pos + 16 : pos + length]))
        pos += (length + 3) & ~3
    return out


def reply(sock: socket.socket, seq: int) -> tuple[int, bytes]:
    """The answer to request `seq`, skipping multicast READYs that arrive before it."""
    while True:
        for kind, s, body in framed(sock.recv(65536)):
            if s == seq:
                return kind, body


def send(
    sock: socket.socket, family: int, cmd: int, payload: bytes, seq: int, flags: int = 0
) -> None:
    body = struct.pack("=BBH", cmd, 1, 0) + payload
    sock.send(struct.pack("=IHHII", 16 + len(body), family, NLM_F_REQUEST | flags, seq, 0) + body)


CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def set_net_admin(on: bool) -> None:
    """CAP_NET_ADMIN in or out of the effective set (it stays permitted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if on:
        data[0].effective |= 1 << CAP_NET_ADMIN
    else:
        data[0].effective &= ~(1 << CAP_NET_ADMIN)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def effective_net_admin() -> int:
    """CAP_NET_ADMIN's bit in this thread's CapEff, as /proc reports it."""
    with open("/proc/thread-self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith("CapEff:"):
            return (int(line.split()[1], 16) >> CAP_NET_ADMIN) & 1
    return -1


def main() -> int:  # noqa: PLR0912, PLR0915 - a linear probe script
    ready_file, status, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    drop_admin = sys.argv[4:5] == ["drop-admin"]
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    sock.bind((0, 0))
    send(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, b"handshake\0"), 1)
    family, group = 0, 0
    for _kind, body in messages(sock.recv(65536)):
        for a, v in attrs(body[4:]):
            if a == CTRL_ATTR_FAMILY_ID:
                family = struct.unpack("=H", v[:2])[0]
            elif a == CTRL_ATTR_MCAST_GROUPS:
                for _, grp in attrs(v):
                    fields = dict(attrs(grp))
                    if fields.get(1, b"").rstrip(b"\0") == b"tlshd":
                        group = struct.unpack("=I", fields[2][:4])[0]
    print(f"PROBE family={family} group={group}", flush=True)
    sock.setsockopt(270, 1, group)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
    open(ready_file, "w").close()
    deadline, seq = time.monotonic() + seconds, 10
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.5)[0]:
            continue
        data = sock.recv(65536)
        if not any(len(b) >= 1 and b[0] == CMD_READY for _, b in messages(data)):
            continue
        while True:
            seq += 1
            send(sock, family, CMD_ACCEPT, attr(2, struct.pack("=I", 1)), seq)
            kind, body = reply(sock, seq)
            if kind == NLMSG_ERROR:
                print(f"PROBE accept_error={struct.unpack_from('=i', body)[0]}", flush=True)
                break
            fd = None
            for a, v in attrs(body[4:]):
                name = ACCEPT_NAMES.get(a & 0x3FFF, str(a))
                value = (
                    v.rstrip(b"\0").decode(errors="replace")
                    if name == "PEERNAME"
                    else (struct.unpack("=I", v)[0] if len(v) == 4 else v.hex())
                )
                print(f"PROBE attr={name}:{len(v)}:{value}", flush=True)
                if name == "SOCKFD":
                    fd = value
            print("PROBE end_of_reply", flush=True)
            if isinstance(fd, int):
                seq += 1
                done = attr(1, struct.pack("=I", status)) + attr(2, struct.pack("=I", fd))
                if drop_admin:
                    set_net_admin(False)
                    print(f"PROBE cap_net_admin_effective={effective_net_admin()}", flush=True)
                send(sock, family, CMD_DONE, done, seq, NLM_F_ACK)
                kind, body = reply(sock, seq)
                if drop_admin:
                    set_net_admin(True)
                    if kind == NLMSG_ERROR and struct.unpack_from("=i", body)[0] != 0:
                        print(f"PROBE done_ack_without_admin={struct.unpack_from('=i', body)[0]}",
                              flush=True)
                        seq += 1  # refused: answer the request with the capability back
                        send(sock, family, CMD_DONE, done, seq, NLM_F_ACK)
                        kind, body = reply(sock, seq)
                if kind == NLMSG_ERROR:
                    print(f"PROBE done_ack={struct.unpack_from('=i', body)[0]}", flush=True)
                os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
