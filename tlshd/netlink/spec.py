"""Wire constants of the ``handshake`` generic netlink family and of nlctrl.

Names follow the kernel: ``HANDSHAKE_A_ACCEPT_SOCKFD`` is ``AcceptAttr.SOCKFD``,
``CTRL_ATTR_FAMILY_ID`` is ``CtrlAttr.FAMILY_ID``. Values were read from the
uapi headers ``linux/handshake.h``, ``linux/genetlink.h`` and
``linux/netlink.h`` (Debian 6.12.117 linux-libc-dev); see
``/work/shared/reference/kernel-handshake-api.md`` sections 2.1-2.5 and 2.9.

Names, numbers and sizes live here, and at the end the attribute sets
declared as pyroute2 classes. Those are the single declaration that
``tlshd.netlink.codec`` encodes with, decodes with and derives its strict
checks from; they are pyroute2 objects, so nothing outside ``tlshd.netlink``
may use them. No parsing, no I/O.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pyroute2.netlink import genlmsg, nla
else:  # without running pyroute2/__init__.py, which imports all of pyroute2 (see _pyroute2)
    from tlshd.netlink._pyroute2 import netlink_module

    _netlink = netlink_module()
    genlmsg, nla = _netlink.genlmsg, _netlink.nla

# --- netlink (linux/netlink.h) ----------------------------------------------

NETLINK_GENERIC: Final = 16

NLMSG_HDRLEN: Final = 16  # struct nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32
NLMSG_ALIGNTO: Final = 4

NLMSG_NOOP: Final = 0x1
NLMSG_ERROR: Final = 0x2
NLMSG_DONE: Final = 0x3
NLMSG_OVERRUN: Final = 0x4
NLMSG_MIN_TYPE: Final = 0x10  # types below are netlink control messages

NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_ACK: Final = 0x04
NLM_F_ECHO: Final = 0x08
# Flags of an NLMSG_ERROR message (linux/netlink.h, "Flags for ACK message").
NLM_F_CAPPED: Final = 0x100  # only the offending nlmsghdr follows the error code
NLM_F_ACK_TLVS: Final = 0x200  # extended-ack attributes follow

NLA_HDRLEN: Final = 4  # struct nlattr: len u16, type u16
NLA_ALIGNTO: Final = 4
NLA_F_NESTED: Final = 1 << 15
NLA_F_NET_BYTEORDER: Final = 1 << 14
NLA_TYPE_MASK: Final = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

MAX_ERRNO: Final = 4095  # linux/err.h; DONE STATUS is capped to this (section 2.4)


class NlmsgerrAttr(IntEnum):
    """``enum nlmsgerr_attrs``: extended-ack TLVs after an NLMSG_ERROR."""

    UNUSED = 0
    MSG = 1
    OFFS = 2
    COOKIE = 3
    POLICY = 4
    MISS_TYPE = 5
    MISS_NEST = 6


# --- generic netlink and nlctrl (linux/genetlink.h) --------------------------

GENL_HDRLEN: Final = 4  # struct genlmsghdr: cmd u8, version u8, reserved u16
GENL_NAMSIZ: Final = 16  # family and group names, NUL included
GENL_ID_CTRL: Final = 0x10  # == NLMSG_MIN_TYPE; nlctrl's fixed family ID

CTRL_CMD_NEWFAMILY: Final = 1  # the command of a GETFAMILY reply
CTRL_CMD_GETFAMILY: Final = 3
CTRL_CMD_GETPOLICY: Final = 10  # a dump (Linux 5.10): which attributes each op accepts
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
# GETPOLICY replies (linux/genetlink.h, linux/netlink.h): CtrlAttr.OP_POLICY holds, per op,
# the index of its "do" policy; CtrlAttr.POLICY holds, per policy index and attribute, its
# NL_POLICY_TYPE_ATTR_* description, of which the type is what the agent needs.
CTRL_ATTR_POLICY_DO: Final = 1
NL_POLICY_TYPE_ATTR_TYPE: Final = 1
# enum netlink_attribute_type, for the log and tlshd doctor
NL_ATTR_TYPE_NAMES: Final = {0: "invalid", 1: "flag", 2: "u8", 3: "u16", 4: "u32", 5: "u64",
                             6: "s8", 7: "s16", 8: "s32", 9: "s64", 10: "binary",
                             11: "string", 12: "nul-string", 13: "nested",
                             14: "nested-array", 15: "bitfield32", 16: "sint", 17: "uint"}
# nlctrl is at version 2; CTRL_CMD_GETFAMILY exists since version 1, which is
# what we (like libnl's genl_ctrl_resolve) put in requests. nlctrl ignores it.
CTRL_REQUEST_VERSION: Final = 1


class CtrlAttr(IntEnum):
    """``CTRL_ATTR_*``: attributes of nlctrl messages."""

    UNSPEC = 0
    FAMILY_ID = 1  # u16
    FAMILY_NAME = 2  # NUL-terminated string
    VERSION = 3  # u32
    HDRSIZE = 4  # u32
    MAXATTR = 5  # u32
    OPS = 6  # nest of nests
    MCAST_GROUPS = 7  # nest of nests (CtrlAttrMcastGrp), entry types are 1..n
    POLICY = 8
    OP_POLICY = 9
    OP = 10


class CtrlAttrMcastGrp(IntEnum):
    """``CTRL_ATTR_MCAST_GRP_*``: one entry of ``CTRL_ATTR_MCAST_GROUPS``."""

    UNSPEC = 0
    NAME = 1  # NUL-terminated string
    ID = 2  # u32


# --- the handshake family (linux/handshake.h) --------------------------------

FAMILY_NAME: Final = "handshake"  # HANDSHAKE_FAMILY_NAME
FAMILY_VERSION: Final = 1  # HANDSHAKE_FAMILY_VERSION
MCGRP_NONE: Final = "none"  # multicast group index 0
MCGRP_TLSHD: Final = "tlshd"  # multicast group index 1 == HandlerClass.TLSHD

# The kernel stores at most this many REMOTE_AUTH serials from DONE
# (tls_handshake_req.th_peerid[5]) and sends at most this many PEER_IDENTITY.
MAX_PEER_IDS: Final = 5


class HandshakeCmd(IntEnum):
    """``HANDSHAKE_CMD_*``."""

    READY = 1  # multicast kernel -> agents
    ACCEPT = 2  # request/reply
    DONE = 3  # request (ACK only)


class HandlerClass(IntEnum):
    """``enum handshake_handler_class``; also the multicast group index."""

    NONE = 0
    TLSHD = 1


class MsgType(IntEnum):
    """``enum handshake_msg_type``: which side of the TLS handshake to play."""

    UNSPEC = 0
    CLIENTHELLO = 1
    SERVERHELLO = 2


class AuthMode(IntEnum):
    """``enum handshake_auth``."""

    UNSPEC = 0
    UNAUTH = 1
    PSK = 2
    X509 = 3


class X509Attr(IntEnum):
    """``HANDSHAKE_A_X509_*``: inside ``AcceptAttr.CERTIFICATE``."""

    CERT = 1  # key serial (u32 on the wire; the 2026 spec says s32)
    PRIVKEY = 2  # key serial (u32 on the wire; the 2026 spec says s32)


class AcceptAttr(IntEnum):
    """``HANDSHAKE_A_ACCEPT_*``: shared by READY, the ACCEPT request and reply."""

    SOCKFD = 1
    HANDLER_CLASS = 2
    MESSAGE_TYPE = 3
    TIMEOUT = 4  # milliseconds
    AUTH_MODE = 5
    PEER_IDENTITY = 6  # multi-attr
    CERTIFICATE = 7  # nest of X509Attr, sent with NLA_F_NESTED
    PEERNAME = 8  # NUL-terminated string (Linux 6.5+)
    KEYRING = 9  # key serial (Linux 6.17+)


class DoneAttr(IntEnum):
    """``HANDSHAKE_A_DONE_*``."""

    STATUS = 1  # 0 or a positive errno <= MAX_ERRNO
    SOCKFD = 2
    REMOTE_AUTH = 3  # multi-attr, at most MAX_PEER_IDS are used


# DONE attribute 4 in the posted session-tags series ("tag", a NUL string, multi-attr), but
# "session-id" in the KeyUpdate series: sent only where the kernel's policy declares a string
DONE_TAG = 4
SESSION_TAG_MAX_LEN = 255  # HANDSHAKE_SESSION_TAG_MAX_LEN
MAX_SESSION_TAGS = 64  # HANDSHAKE_MAX_SESSIONTAGS


# --- attribute sets, declared for pyroute2 (used by codec only) -------------
# ``multi_attrs`` is ours, not pyroute2's: attribute types that may repeat.


class X509Nla(nla):  # type: ignore[misc]
    """Attribute set ``x509`` (nested in ``HANDSHAKE_A_ACCEPT_CERTIFICATE``)."""

    __slots__ = ()
    # The kernel sends this nest with NLA_F_NESTED; declared on the class, which every
    # pyroute2 from 0.7 on honours (the "x509|nested" spelling needs pyroute2 >= 0.9.6,
    # newer than Debian trixie's python3-pyroute2 0.8.1)
    nla_flags = NLA_F_NESTED
    nla_map = (
        (X509Attr.CERT, "HANDSHAKE_A_X509_CERT", "uint32"),
        (X509Attr.PRIVKEY, "HANDSHAKE_A_X509_PRIVKEY", "uint32"),
    )


class AcceptMsg(genlmsg):  # type: ignore[misc]
    """Attribute set ``accept``: READY, the ACCEPT request and the ACCEPT reply."""

    __slots__ = ()
    nla_map = (
        (AcceptAttr.SOCKFD, "HANDSHAKE_A_ACCEPT_SOCKFD", "uint32"),
        (AcceptAttr.HANDLER_CLASS, "HANDSHAKE_A_ACCEPT_HANDLER_CLASS", "uint32"),
        (AcceptAttr.MESSAGE_TYPE, "HANDSHAKE_A_ACCEPT_MESSAGE_TYPE", "uint32"),
        (AcceptAttr.TIMEOUT, "HANDSHAKE_A_ACCEPT_TIMEOUT", "uint32"),
        (AcceptAttr.AUTH_MODE, "HANDSHAKE_A_ACCEPT_AUTH_MODE", "uint32"),
        (AcceptAttr.PEER_IDENTITY, "HANDSHAKE_A_ACCEPT_PEER_IDENTITY", "uint32"),
        (AcceptAttr.CERTIFICATE, "HANDSHAKE_A_ACCEPT_CERTIFICATE", "x509"),
        (AcceptAttr.PEERNAME, "HANDSHAKE_A_ACCEPT_PEERNAME", "asciiz"),
        (AcceptAttr.KEYRING, "HANDSHAKE_A_ACCEPT_KEYRING", "uint32"),
    )
    multi_attrs = frozenset({AcceptAttr.PEER_IDENTITY})
    x509 = X509Nla


class DoneMsg(genlmsg):  # type: ignore[misc]
    """Attribute set ``done``: the DONE request."""

    __slots__ = ()
    nla_map = (
        (DoneAttr.STATUS, "HANDSHAKE_A_DONE_STATUS", "uint32"),
        (DoneAttr.SOCKFD, "HANDSHAKE_A_DONE_SOCKFD", "uint32"),
        (DoneAttr.REMOTE_AUTH, "HANDSHAKE_A_DONE_REMOTE_AUTH", "uint32"),
    )
    multi_attrs = frozenset({DoneAttr.REMOTE_AUTH})


# kernel-sim's private family (docs/kernel-sim.md): what a real kernel does with
# setsockopt(2) (group membership, kTLS keys) goes to the simulator as these requests.
KSIM_FAMILY_NAME: Final = "kernel_sim"


class KsimCmd(IntEnum):
    ADD_MEMBERSHIP = 1
    SETSOCKOPT = 3


class KsimAttr(IntEnum):
    GROUP = 1
    SOCKFD = 2
    LEVEL = 3
    OPTNAME = 4
    OPTVAL = 5


class KsimMsg(genlmsg):  # type: ignore[misc]
    """kernel-sim's ADD_MEMBERSHIP and SETSOCKOPT requests."""

    __slots__ = ()
    nla_map = (
        (KsimAttr.GROUP, "KSIM_A_GROUP", "uint32"),
        (KsimAttr.SOCKFD, "KSIM_A_SOCKFD", "int32"),
        (KsimAttr.LEVEL, "KSIM_A_LEVEL", "uint32"),
        (KsimAttr.OPTNAME, "KSIM_A_OPTNAME", "uint32"),
        (KsimAttr.OPTVAL, "KSIM_A_OPTVAL", "cdata"),
    )


class McastGrpNla(nla):  # type: ignore[misc]
    """One entry of ``CTRL_ATTR_MCAST_GROUPS``."""

    __slots__ = ()
    nla_map = (
        (CtrlAttrMcastGrp.NAME, "CTRL_ATTR_MCAST_GRP_NAME", "asciiz"),
        (CtrlAttrMcastGrp.ID, "CTRL_ATTR_MCAST_GRP_ID", "uint32"),
    )


class CtrlMsg(genlmsg):  # type: ignore[misc]
    """The nlctrl attributes we send or read; the rest count as unknown."""

    __slots__ = ()
    nla_map = (
        (CtrlAttr.FAMILY_ID, "CTRL_ATTR_FAMILY_ID", "uint16"),
        (CtrlAttr.FAMILY_NAME, "CTRL_ATTR_FAMILY_NAME", "asciiz"),
        (CtrlAttr.VERSION, "CTRL_ATTR_VERSION", "uint32"),
        (CtrlAttr.HDRSIZE, "CTRL_ATTR_HDRSIZE", "uint32"),
        (CtrlAttr.MAXATTR, "CTRL_ATTR_MAXATTR", "uint32"),
        (CtrlAttr.OPS, "CTRL_ATTR_OPS", "none"),
        (CtrlAttr.MCAST_GROUPS, "CTRL_ATTR_MCAST_GROUPS", "*mcast_grp"),
    )
    mcast_grp = McastGrpNla


class ExtAckAttrs:
    """Extended-ack TLVs; only checked by our rules, read without pyroute2."""

    nla_map = (
        (NlmsgerrAttr.MSG, "NLMSGERR_ATTR_MSG", "asciiz"),
        (NlmsgerrAttr.OFFS, "NLMSGERR_ATTR_OFFS", "uint32"),
        (NlmsgerrAttr.COOKIE, "NLMSGERR_ATTR_COOKIE", "none"),
        (NlmsgerrAttr.POLICY, "NLMSGERR_ATTR_POLICY", "none"),
        (NlmsgerrAttr.MISS_TYPE, "NLMSGERR_ATTR_MISS_TYPE", "uint32"),
        (NlmsgerrAttr.MISS_NEST, "NLMSGERR_ATTR_MISS_NEST", "uint32"),
    )
