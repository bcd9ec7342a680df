"""Upcall transports: the kernel's ``handshake`` family over AF_NETLINK, or kernel-sim.

Theory of operation
-------------------
An ``Upcall`` gives the worker four operations: wait for READY
(``notify_fileno`` + ``drain_notifications``), ``accept()`` (the next request,
or None on EAGAIN), ``done()`` and ``setsockopt()`` (the kTLS installation
port). Two sockets are used, as the reference agent does: one joined to the
``tlshd`` multicast group that only ever carries READY, one for synchronous
requests, so a READY can never arrive in the middle of an ACCEPT exchange.

Both transports carry the same netlink bytes, encoded and decoded by
``tlshd.netlink.codec``. They differ only at the edge:

* ``netlink``: AF_NETLINK/NETLINK_GENERIC sockets; the group is joined with
  setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP); ACCEPT installs the socket
  in our fd table and SOCKFD names it; key installation is a real setsockopt.
* ``kernel-sim``: Unix SOCK_SEQPACKET connections to the simulator's abstract
  endpoint in our network namespace (docs/kernel-sim.md); the group is joined
  and setsockopt is carried by the simulator's private ``kernel_sim`` family;
  the ACCEPT reply brings the socket as an SCM_RIGHTS fd, which replaces SOCKFD.
  It is used only when named (``upcall = kernel-sim[:NAME]``), and only if the process
  that bound the endpoint runs as root or as this agent's user (SO_PEERCRED): an abstract
  name can be bound by anyone, and whoever serves it would receive the session keys.

ACCEPT must run in the process that will own the fd: each worker process
opens its own Upcall.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from tlshd.errors import (
    DecodeError,
    NetlinkError,
    TlshdError,
    TransportError,
    TransportTimeoutError,
)
from tlshd.ktls import BatchSockoptError, KernelSockopt
from tlshd.netlink import codec, spec
from tlshd.netlink.messages import (
    AcceptReply,
    DumpDone,
    ErrorReply,
    FamilyInfo,
    FamilyPolicy,
    PolicyPart,
    Ready,
)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_GENERIC = 16
FAMILY_NAME = "handshake"
GROUP_NAME = "tlshd"
REQUEST_TIMEOUT_S = 5.0
RECV_SIZE = 65536
MSG_CMSG_CLOEXEC = 0x40000000

# The simulator's private family (kernel-sim/kernel_sim/kernel.py; docs/kernel-sim.md).
KSIM_FAMILY_NAME = spec.KSIM_FAMILY_NAME
DEFAULT_SIM_ENDPOINT = "kernel-sim"
nl_log = logging.getLogger("tlshd.netlink")  # [debug] nl > 0


class BrokenAcceptError(Exception):
    """An ACCEPT reply that could not be decoded; ``sockfd`` is the fd we got, if any."""

    def __init__(self, error: DecodeError, sockfd: int | None) -> None:
        super().__init__(str(error))
        self.error, self.sockfd = error, sockfd


class Upcall(Protocol):
    def notify_fileno(self) -> int: ...

    def drain_notifications(self) -> int: ...

    def accept(self) -> AcceptReply | None: ...

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        """``peer`` (the verified subject), ``cipher`` and ``data`` (what the server sent
        before the hand-over, decrypted) are for an application's answer (tlshd.appserver);
        the kernel's DONE has no place for them."""
        ...

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None: ...

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        """The kTLS steps in one go (``tlshd.ktls.BatchSockoptPort``)."""
        ...

    def close(self) -> None: ...


class _GenlUpcall:
    """What both transports share: family resolution, request/reply matching."""

    def __init__(self, notify: socket.socket, request: socket.socket, *,
                 join: bool = True) -> None:
        """``join=False`` only checks that the family resolves (a start-up probe must not
        count as an agent: the kernel would send READY to it, and nobody would ACCEPT)."""
        self._notify, self._request = notify, request
        self._seq = itertools.count(1)
        self._family_id: int | None = None
        self._request.settimeout(REQUEST_TIMEOUT_S)
        self.family = self._resolve()
        self._family_id = self.family.family_id
        self.policy = self._read_policy()
        if GROUP_NAME not in self.family.mcast_groups:
            raise TransportError(f"family {FAMILY_NAME!r} has no {GROUP_NAME!r} group")
        if join:
            self._join(self.family.mcast_groups[GROUP_NAME])
        self._notify.setblocking(False)

    # transport-specific hooks
    def _join(self, group_id: int) -> None:
        raise NotImplementedError

    def _closed(self, sock: socket.socket) -> bool:
        """After an empty read: did the other side close? Netlink has no end of stream."""
        return False

    def _recv(self) -> tuple[bytes, list[int]]:
        data = self._request.recv(RECV_SIZE)
        return data, []

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        raise NotImplementedError

    # shared
    def notify_fileno(self) -> int:
        return self._notify.fileno()

    def drain_notifications(self) -> int:
        """Read every queued multicast; returns how many READY messages there were."""
        count = 0
        while True:
            try:
                data = self._notify.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError as exc:  # ENOBUFS: READYs were lost; an ACCEPT sweep recovers
                if exc.errno == errno.ENOBUFS:
                    return count + 1
                raise TransportError(f"notification socket: {exc.strerror}") from exc
            if not data:
                if self._closed(self._notify):
                    raise TransportError("notification socket closed by the kernel side")
                continue  # an empty datagram: nothing to read in it
            with contextlib.suppress(DecodeError):
                messages = codec.decode(data, self.family.family_id)
                count += sum(isinstance(m, Ready) for m in messages)

    def _resolve(self) -> FamilyInfo:
        seq = next(self._seq)
        self._request.send(codec.encode_get_family(FAMILY_NAME, seq))
        for message in self._replies(seq, "resolve family"):
            if isinstance(message, FamilyInfo):
                return message
        raise TransportError("no family reply")

    def _read_policy(self) -> FamilyPolicy | None:
        """The family's policy (nlctrl GETPOLICY, Linux 5.10): which attributes each op
        accepts, so that an optional one is sent only where this kernel declares it. None if
        the kernel does not say (then only what every kernel accepts is sent)."""
        seq = next(self._seq)
        self._request.send(codec.encode_get_policy(self.family.family_id, seq))
        parts: list[PolicyPart] = []
        try:
            while True:
                messages = self._replies(seq, "GETPOLICY")
                parts += [m for m in messages if isinstance(m, PolicyPart)]
                if any(isinstance(m, DumpDone) for m in messages):
                    break
        except (NetlinkError, TransportTimeoutError) as exc:
            nl_log.debug("no policy for %s: %s", FAMILY_NAME, exc)
            return None
        policy = FamilyPolicy.from_parts(parts)
        nl_log.debug("policy of %s: %s", FAMILY_NAME, policy.describe(_OP_NAMES))
        return policy

    def _replies(self, seq: int, what: str, fds: list[int] | None = None) -> list[object]:
        """Receive until a message answers ``seq``; NLMSG_ERROR < 0 raises NetlinkError."""
        while True:
            try:
                data, got_fds = self._recv()
            except TimeoutError:
                raise TransportTimeoutError(f"{what}: no answer in {REQUEST_TIMEOUT_S} s") from None
            except OSError as exc:
                raise TransportError(f"{what}: {exc.strerror}") from exc
            if not data:
                _close_fds(got_fds)
                if self._closed(self._request):
                    raise TransportError(f"{what}: the kernel side closed the connection")
                continue  # an empty datagram: nothing to read in it
            try:
                messages = codec.decode(data, self._family_id)
            except DecodeError:
                if fds is not None:
                    fds.extend(got_fds)  # ours, in a broken reply: salvaged by the caller
                else:
                    _close_fds(got_fds)
                raise
            mine = [m for m in messages if _seq_of(m) == seq]
            if not mine:  # a late answer to an earlier request that we gave up on
                self._discard_stale(messages, got_fds)
                continue
            if fds is not None:
                fds.extend(got_fds)
            else:
                _close_fds(got_fds)
            return _raise_errors(mine, what)

    def accept(self) -> AcceptReply | None:
        seq = next(self._seq)
        self._request.send(codec.encode_accept(self.family.family_id, seq))
        fds: list[int] = []
        try:
            replies = self._replies(seq, "ACCEPT", fds)
        except NetlinkError as exc:
            _close_fds(fds)
            if exc.errno == errno.EAGAIN:
                return None
            raise
        except DecodeError as exc:
            raise BrokenAcceptError(exc, self._salvage(exc, fds)) from exc
        reply = next((m for m in replies if isinstance(m, AcceptReply)), None)
        if reply is None:
            _close_fds(fds)
            return None
        reply = self._own_fd(reply, fds)
        if nl_log.isEnabledFor(logging.DEBUG):  # [debug] nl: nothing is formatted otherwise
            nl_log.debug("ACCEPT seq=%d sockfd=%d type=%s auth=%s peername=%s timeout_ms=%s "
                         "keyring=%s peer_ids=%s certificate=%s unknown_attrs=%s", seq,
                         reply.sockfd, reply.message_type.name, reply.auth_mode.name,
                         reply.peername, reply.timeout_ms, reply.keyring, reply.peer_identities,
                         reply.certificate, reply.unknown_attrs)
        return reply

    def _own_fd(self, reply: AcceptReply, fds: list[int]) -> AcceptReply:
        return reply

    def _discard_stale(self, messages: Sequence[object], fds: list[int]) -> None:
        """Close the fds of a reply nobody waits for (the request behind it times out)."""
        _close_fds(fds)

    def _salvage(self, error: DecodeError, fds: list[int]) -> int | None:
        """The fd of a broken reply, so the request still gets its DONE and the fd is closed.

        The kernel installed it in our table before replying; the codec recovers SOCKFD from
        a reply it could not otherwise decode when the attribute itself was intact.
        """
        _close_fds(fds)
        return error.sockfd if isinstance(error, codec.AcceptDecodeError) else None

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int],
             tags: Sequence[str] = (), *, peer: str = "", cipher: str = "",
             data: bytes = b"") -> None:
        """DONE. ``tags`` go only with a success and only where the kernel declares them
        (ktls-utils 1.4.0 netlink.c, tlshd_genl_done: after REMOTE_AUTH, status 0 only)."""
        seq = next(self._seq)
        nl_log.debug("DONE seq=%d sockfd=%d status=%d remote_auth=%s tags=%d", seq, sockfd,
                     status, tuple(remote_auth), len(tags))
        if not self._declares(spec.HandshakeCmd.DONE, spec.DoneAttr.REMOTE_AUTH):
            remote_auth = ()  # a kernel whose DONE policy lacks it would refuse the message
        sent = tuple(tags[:spec.MAX_SESSION_TAGS]) if status == 0 and self.session_tags else ()
        self._request.send(codec.encode_done(self.family.family_id, seq, status, sockfd,
                                             tuple(remote_auth), sent))
        self._replies(seq, "DONE")

    @property
    def session_tags(self) -> bool:
        """DONE takes session tags: attribute 4 declared as a string (the posted tags series;
        in the KeyUpdate series attribute 4 is a session id, and in 6.12 and 7.3 nothing)."""
        if self.policy is None:
            return False
        kind = self.policy.ops.get(spec.HandshakeCmd.DONE, {}).get(spec.DONE_TAG)
        return kind in (NL_ATTR_TYPE_STRING, NL_ATTR_TYPE_NUL_STRING)

    def _declares(self, op: int, attr: int) -> bool:
        """Whether DONE (or another op) may carry ``attr`` here: the kernel's policy says,
        and without one the attributes every kernel since 6.4 accepts are assumed."""
        if self.policy is None or op not in self.policy.ops:
            return True
        return self.policy.accepts(op, attr)

    def close(self) -> None:
        self._notify.close()
        self._request.close()


_OP_NAMES = {int(c): c.name for c in spec.HandshakeCmd}
NL_ATTR_TYPE_STRING, NL_ATTR_TYPE_NUL_STRING = 11, 12


def _seq_of(message: object) -> int | None:
    header = getattr(message, "header", None)
    return getattr(header, "seq", getattr(message, "seq", None))


def _raise_errors(messages: Sequence[object], what: str) -> list[object]:
    for message in messages:
        if isinstance(message, ErrorReply) and message.errno:
            raise NetlinkError(message.errno, what)
    return list(messages)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class NetlinkUpcall(_GenlUpcall):
    """The real kernel: AF_NETLINK generic netlink in this network namespace."""

    def __init__(self, *, join: bool = True) -> None:
        notify, request = (_netlink_socket() for _ in range(2))
        try:
            super().__init__(notify, request, join=join)
        except BaseException:
            notify.close()
            request.close()
            raise
        self._sockopt = KernelSockopt()

    def _join(self, group_id: int) -> None:
        self._notify.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group_id)

    def _discard_stale(self, messages: Sequence[object], fds: list[int]) -> None:
        # The kernel installed a late ACCEPT's socket in our fd table: do not leak it.
        _close_fds([m.sockfd for m in messages if isinstance(m, AcceptReply)])

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        self._sockopt.setsockopt(fd, level, optname, value)

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        self._sockopt.setsockopts(fd, steps)


def _netlink_socket() -> socket.socket:
    """A generic netlink socket that only the kernel can unicast to: connected to port 0,
    so the kernel refuses (ECONNREFUSED) a datagram any other socket sends to our port
    (af_netlink.c, netlink_getsockbyportid). Without it, any local process could forge an
    ACCEPT reply whose SOCKFD names an fd this worker already holds, or an empty or
    malformed reply."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.connect((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


class SimUpcall(_GenlUpcall):
    """kernel-sim: its endpoint in this network namespace (abstract Unix name)."""

    def __init__(self, endpoint: str = DEFAULT_SIM_ENDPOINT, *, join: bool = True) -> None:
        address = b"\0" + endpoint.encode() + b"/genl"
        notify, request = (_seqpacket(address) for _ in range(2))
        self._sim_notify = notify
        try:
            super().__init__(notify, request, join=join)
        except BaseException:
            notify.close()
            request.close()
            raise

    def _closed(self, sock: socket.socket) -> bool:
        return seqpacket_closed(sock)

    def _recv(self) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        data, anc, _flags, _ = self._request.recvmsg(
            RECV_SIZE, socket.CMSG_SPACE(16 * fds.itemsize), MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return data, list(fds)

    def _salvage(self, error: DecodeError, fds: list[int]) -> int | None:
        """kernel-sim passes the socket with SCM_RIGHTS: that fd is the one to answer for."""
        if len(fds) == 1:
            return fds[0]
        _close_fds(fds)
        return None

    def _own_fd(self, reply: AcceptReply, fds: list[int]) -> AcceptReply:
        if len(fds) != 1:
            _close_fds(fds)
            error = DecodeError(f"ACCEPT reply carried {len(fds)} fds, not 1")
            raise BrokenAcceptError(error, None)
        if reply.keyring:
            _link_request_keyring(reply.keyring)
        return replace(reply, sockfd=fds[0])


    def _ksim_family_id(self) -> int:
        if not hasattr(self, "_ksim_id"):
            seq = next(self._seq)
            self._request.send(codec.encode_get_family(KSIM_FAMILY_NAME, seq))
            infos = [m for m in self._replies(seq, "resolve kernel_sim") if
                     isinstance(m, FamilyInfo)]
            if not infos:
                raise TransportError("kernel-sim has no kernel_sim family")
            self._ksim_id = infos[0].family_id
        return self._ksim_id

    def _join(self, group_id: int) -> None:
        # Sent on the notify connection: membership belongs to that "socket".
        seq = next(self._seq)
        msg = codec.encode_ksim_membership(self._ksim_family_id(), seq, group_id)
        self._sim_notify.sendall(msg)
        self._sim_notify.settimeout(REQUEST_TIMEOUT_S)
        data = self._sim_notify.recv(RECV_SIZE)
        for message in codec.decode(data, None):
            if isinstance(message, ErrorReply) and message.errno:
                raise NetlinkError(message.errno, "join group")

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> None:
        seq = next(self._seq)
        try:
            self._request.send(codec.encode_ksim_setsockopt(self._ksim_family_id(), seq, fd,
                                                            level, optname, value))
            self._replies(seq, "setsockopt")
        except NetlinkError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None

    def setsockopts(self, fd: int, steps: Sequence[tuple[int, int, bytes]]) -> None:
        """Every step in one datagram, one round trip (kernel-sim handles each message of it
        in turn, as netlink_rcv_skb does, and acks each)."""
        family = self._ksim_family_id()
        seqs = [next(self._seq) for _ in steps]
        self._request.send(b"".join(codec.encode_ksim_setsockopt(family, seq, fd, *step)
                                    for seq, step in zip(seqs, steps, strict=True)))
        failed: BatchSockoptError | None = None
        for index, seq in enumerate(seqs):  # every ack is read, so none is left behind
            try:
                self._replies(seq, "setsockopt")
            except NetlinkError as exc:
                failed = failed or BatchSockoptError(index, OSError(exc.errno,
                                                                    os.strerror(exc.errno)))
        if failed is not None:
            raise failed


def _link_request_keyring(serial: int) -> None:
    """What Linux does at ACCEPT (``tls_handshake_private_keyring``) and kernel-sim cannot:
    link the request's keyring into our process keyring, which makes us a possessor of its
    keys. The permission checked is ours (LINK on the keyring), as in the kernel."""
    from tlshd import keyring

    with contextlib.suppress(TlshdError):
        keyring.link_key(serial, keyring.KEY_SPEC_PROCESS_KEYRING)


def _seqpacket(address: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    name = address[1:].decode(errors="replace")
    try:
        sock.connect(address)
        uid = endpoint_owner(sock)
    except OSError as exc:
        sock.close()
        raise TransportError(f"kernel-sim endpoint {name!r}: {exc.strerror}") from exc
    if uid not in trusted_uids():
        sock.close()
        raise TransportError(f"kernel-sim endpoint {name!r} is served by uid {uid}, not by "
                             f"root or this agent's uid {os.geteuid()}: refused (it would "
                             "receive the session keys)")
    return sock


def endpoint_owner(sock: socket.socket) -> int:
    """The uid of the process that bound the endpoint ``sock`` is connected to."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def trusted_uids() -> frozenset[int]:
    """Who may serve this agent's kernel-sim endpoint: root and the agent's own user."""
    return frozenset((0, os.geteuid()))


def seqpacket_closed(sock: socket.socket) -> bool:
    """A SOCK_SEQPACKET read of b"" is an empty message or the end: poll tells which."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))


def open_upcall(mode: str, *, join: bool = True) -> Upcall:
    """``kernel-sim[:NAME]``: that endpoint; anything else (``netlink``, ``auto``): the
    kernel's family. kernel-sim is never a fallback: it must be named.
    ``join=False``: a probe that does not join the ``tlshd`` group."""
    if mode.startswith("kernel-sim"):
        return SimUpcall(mode.partition(":")[2] or DEFAULT_SIM_ENDPOINT, join=join)
    if mode == "netlink":
        return NetlinkUpcall(join=join)
    try:
        return NetlinkUpcall(join=join)
    except (NetlinkError, TransportError, OSError) as kernel_error:
        raise TransportError(
            f"this network namespace has no 'handshake' netlink family ({kernel_error}): is "
            "the kernel built with CONFIG_NET_HANDSHAKE? (kernel-sim is served only when "
            "named: [agent] upcall = kernel-sim, or tlshd demo)"
        ) from None
