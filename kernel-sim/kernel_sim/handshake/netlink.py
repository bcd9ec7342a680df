"""The ``handshake`` generic netlink family, after ``net/handshake/netlink.c`` and genl.c.

``accept_doit`` and ``done_doit`` take a parsed request and the sender's
context and return the reply (or raise NetlinkError with the negative errno
that ``netlink_ack`` turns into NLMSG_ERROR). The family and its op policies
are those YNL generates from Documentation/netlink/specs/handshake.yaml:
ACCEPT has maxattr HANDLER_CLASS (2) with ``NLA_POLICY_MAX(NLA_U32, 2)`` and
GENL_ADMIN_PERM; DONE has maxattr REMOTE_AUTH (3), STATUS optionally capped
at MAX_ERRNO (profile), SOCKFD s32.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel_sim import genl
from kernel_sim.handshake.request import (
    HANDLER_CLASS_MAX,
    HandshakeNet,
    HandshakeReq,
    RequestTable,
)
from kernel_sim.handshake.tlshd import (
    A_ACCEPT_HANDLER_CLASS,
    A_DONE_REMOTE_AUTH,
    A_DONE_SOCKFD,
    A_DONE_STATUS,
    TLS_MAX_PEERIDS,
    TLSProto,
)
from kernel_sim.profile import KernelProfile

FAMILY_NAME = "handshake"
FAMILY_VERSION = 1
CMD_READY = 1
CMD_ACCEPT = 2
CMD_DONE = 3
GROUPS = ("none", "tlshd")  # group index == handler class


def accept_policy(profile: KernelProfile) -> genl.OpPolicy:
    return genl.OpPolicy(
        maxattr=A_ACCEPT_HANDLER_CLASS,
        attrs={A_ACCEPT_HANDLER_CLASS: genl.AttrPolicy("u32", max_value=HANDLER_CLASS_MAX)},
        admin_perm=profile.accept_admin_perm,
    )


A_DONE_TAG = 4  # the posted session-tags series (the KeyUpdate series has session-id here)
# that series: HANDSHAKE_SESSION_TAG_MAX_LEN (the policy's max-len) and HANDSHAKE_MAX_SESSIONTAGS
# (the tags past it are dropped, with a pr_warn_once)
SESSION_TAG_MAX_LEN = 255
MAX_SESSION_TAGS = 64


def done_policy(profile: KernelProfile) -> genl.OpPolicy:
    attrs = {
        A_DONE_STATUS: genl.AttrPolicy("u32", max_value=profile.done_status_max),
        A_DONE_SOCKFD: genl.AttrPolicy("s32"),
        A_DONE_REMOTE_AUTH: genl.AttrPolicy("u32"),
    }
    if profile.done_tags:
        attrs[A_DONE_TAG] = genl.AttrPolicy("string", max_len=SESSION_TAG_MAX_LEN)
    return genl.OpPolicy(
        maxattr=max(attrs),
        attrs=attrs,
        admin_perm=profile.done_admin_perm,
    )


def family_desc(
    profile: KernelProfile, family_id: int, group_ids: tuple[int, int]
) -> genl.FamilyDesc:
    return genl.FamilyDesc(
        name=FAMILY_NAME,
        family_id=family_id,
        version=FAMILY_VERSION,
        maxattr=A_DONE_TAG if profile.done_tags else A_DONE_REMOTE_AUTH,
        ops={CMD_ACCEPT: accept_policy(profile), CMD_DONE: done_policy(profile)},
        mcast_groups=tuple(zip(GROUPS, group_ids, strict=True)),
    )


def ready_message(family_id: int, handler_class: int) -> bytes:
    """``handshake_genl_notify``: portid 0, seq 0, one HANDLER_CLASS attribute."""
    attrs = genl.nla_u32(A_ACCEPT_HANDLER_CLASS, handler_class)
    return genl.genlmsg(family_id, CMD_READY, FAMILY_VERSION, attrs)


@dataclass
class AcceptResult:
    """What ACCEPT produced: the reply bytes and the socket whose file the agent gets."""

    reply: bytes
    sock: Any


def accept_doit(
    table: RequestTable,
    net: HandshakeNet,
    proto: TLSProto,
    msg: genl.GenlMessage,
    *,
    family_id: int,
    portid: int,
    sockfd_for: Callable[[Any], int],
) -> AcceptResult:
    """``handshake_nl_accept_doit``."""
    attrs = genl.validate_attrs(msg.attr_data, accept_policy(proto.profile))
    if A_ACCEPT_HANDLER_CLASS not in attrs:
        raise genl.NetlinkError(-errno.EINVAL, "HANDLER_CLASS missing")
    handler_class = genl.get_u32(attrs[A_ACCEPT_HANDLER_CLASS][0])
    req = table.next(net, handler_class)
    if req is None:
        raise genl.NetlinkError(-errno.EAGAIN, "no pending request")
    body = proto.accept_attrs(req, sockfd_for(req.sock))
    reply = genl.genlmsg(family_id, msg.cmd, FAMILY_VERSION, body, seq=msg.header.seq, pid=portid)
    return AcceptResult(reply=reply, sock=req.sock)


def done_doit(
    table: RequestTable,
    proto: TLSProto,
    msg: genl.GenlMessage,
    *,
    sock_key_of_fd: Callable[[int], int],
    on_found: Callable[[HandshakeReq], None] = lambda req: None,
) -> None:
    """``handshake_nl_done_doit``: sock_key_of_fd raises NetlinkError(-EBADF) for a bad fd;
    ``on_found`` is the ``trace_handshake_cmd_done`` point, before completion."""
    attrs = genl.validate_attrs(msg.attr_data, done_policy(proto.profile))
    if A_DONE_SOCKFD not in attrs:
        raise genl.NetlinkError(-errno.EINVAL, "SOCKFD missing")
    sock_key = sock_key_of_fd(genl.get_s32(attrs[A_DONE_SOCKFD][0]))
    req = table.lookup(sock_key)
    if req is None:
        raise genl.NetlinkError(-errno.EBUSY, "no request on that socket")
    on_found(req)
    remote = tuple(genl.get_u32(p) for p in attrs.get(A_DONE_REMOTE_AUTH, []))[:TLS_MAX_PEERIDS]
    req.session_tags = tuple(genl.get_string(p) for p in attrs.get(A_DONE_TAG, []))[
        :MAX_SESSION_TAGS]
    if A_DONE_STATUS in attrs:
        seen = -_as_int(genl.get_u32(attrs[A_DONE_STATUS][0]))
    else:
        seen = proto.profile.internal_status(errno.EIO)
    table.complete(req, seen, remote)


def _as_int(status: int) -> int:
    """The u32 read as the kernel's ``int status`` (a huge value wraps negative)."""
    return status - (1 << 32) if status >= 1 << 31 else status
