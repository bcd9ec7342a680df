"""Typed values decoded from netlink messages the kernel sends to the agent.

``tlshd.netlink.codec.decode`` turns bytes into these; nothing else in the
agent sees a pyroute2 object. Every value keeps the ``Header`` it arrived
with, so callers can match replies to requests by ``seq``.

Key serials and fds are plain ``int``. The kernel puts SOCKFD and the x509
serials with ``nla_put_s32`` and the 2026 spec retypes them to s32, but the
four bytes are the same; the codec reads them as unsigned (a key serial is
always positive, an fd is checked to be below 2**31).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tlshd.errors import NetlinkError
from tlshd.netlink.spec import AuthMode, HandlerClass, MsgType


@dataclass(frozen=True)
class Header:
    """The ``nlmsghdr`` a message came with (``length`` is left out)."""

    type: int
    flags: int
    seq: int
    pid: int


@dataclass(frozen=True)
class FamilyInfo:
    """An nlctrl ``CTRL_CMD_NEWFAMILY`` message (the GETFAMILY reply).

    ``mcast_groups`` maps group name to group ID (read-only mapping).
    """

    header: Header
    name: str
    family_id: int
    version: int
    mcast_groups: Mapping[str, int]


@dataclass(frozen=True)
class Ready:
    """``HANDSHAKE_CMD_READY``: a request of ``handler_class`` is pending.

    A class this agent does not know stays a plain ``int``.
    """

    header: Header
    handler_class: HandlerClass | int


@dataclass(frozen=True)
class X509Serials:
    """``HANDSHAKE_A_ACCEPT_CERTIFICATE``: key serials, 0 meaning none."""

    cert: int
    privkey: int


@dataclass(frozen=True)
class AcceptReply:
    """The kernel's reply to ``HANDSHAKE_CMD_ACCEPT``.

    ``sockfd`` is already in this process's fd table (O_CLOEXEC): whoever
    receives this value owns that fd. Only wire-level checks were made;
    whether e.g. PSK mode came with peer identities is for the caller to judge.
    ``unknown_attrs`` lists attribute types this codec does not know, in the
    order first seen.
    """

    header: Header
    sockfd: int
    message_type: MsgType
    auth_mode: AuthMode
    peername: str | None
    timeout_ms: int | None
    keyring: int | None
    peer_identities: tuple[int, ...]
    certificate: X509Serials | None
    unknown_attrs: tuple[int, ...]
    # an application's request (tlshd.appserver): the [app.credentials.NAME] its policy rule
    # names; never from the kernel
    profile: str = ""


@dataclass(frozen=True)
class Ack:
    """An NLMSG_ERROR with error 0: the request ``seq`` succeeded."""

    header: Header

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def pid(self) -> int:
        return self.header.pid


@dataclass(frozen=True)
class ErrorReply:
    """An NLMSG_ERROR with a nonzero error: request ``seq`` failed.

    ``errno`` is positive. ``offending_type`` is the nlmsg type of the
    request that failed; ``message`` is the extended-ack text, if the socket
    asked for extended acks and the kernel gave one.
    """

    header: Header
    errno: int
    offending_type: int
    message: str | None = None

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def pid(self) -> int:
        return self.header.pid

    def to_exception(self, context: str) -> NetlinkError:
        """The error to raise for this reply; ``context`` names the request."""
        if self.message:
            context = f"{context} ({self.message})"
        return NetlinkError(self.errno, context)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


@dataclass(frozen=True)
class PolicyPart:
    """One message of a CTRL_CMD_GETPOLICY dump: ops' policy indices, attributes' types."""

    header: Header
    family_id: int
    op_policies: tuple[tuple[int, int], ...]  # (op, index of its "do" policy)
    attributes: tuple[tuple[int, int, int], ...]  # (policy index, attribute, NL_ATTR_TYPE)


@dataclass(frozen=True)
class DumpDone:
    """NLMSG_DONE: the end of a dump."""

    header: Header


@dataclass(frozen=True)
class FamilyPolicy:
    """What the running kernel's family accepts: op -> {attribute: NL_ATTR_TYPE}."""

    ops: Mapping[int, Mapping[int, int]]

    @classmethod
    def from_parts(cls, parts: Sequence[PolicyPart]) -> FamilyPolicy:
        index: dict[int, int] = {}
        attributes: dict[int, dict[int, int]] = {}
        for part in parts:
            index.update(part.op_policies)
            for policy, attr, kind in part.attributes:
                attributes.setdefault(policy, {})[attr] = kind
        return cls(MappingProxyType({op: MappingProxyType(dict(attributes.get(i, {})))
                                     for op, i in index.items()}))

    def accepts(self, op: int, attr: int) -> bool:
        return attr in self.ops.get(op, {})

    def describe(self, names: Mapping[int, str]) -> str:
        """E.g. ``ACCEPT(1) DONE(1,2,3)``, ops by ``names``."""
        return " ".join(f"{names.get(op, str(op))}({','.join(map(str, sorted(attrs)))})"
                        for op, attrs in sorted(self.ops.items()))


@dataclass(frozen=True)
class Unknown:
    """A well-framed message of a type or command this codec does not handle
    (NLMSG_DONE, NLMSG_NOOP, another family, a handshake command other than
    READY/ACCEPT). Tolerated, not an error."""

    header: Header


Message = (FamilyInfo | Ready | AcceptReply | Ack | ErrorReply | PolicyPart | DumpDone
           | Unknown)
