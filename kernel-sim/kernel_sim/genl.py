"""Byte-exact netlink and generic netlink, as the kernel builds and checks them.

Theory of operation
-------------------
This module is the simulator's ``net/netlink/af_netlink.c`` +
``net/netlink/genetlink.c`` + ``lib/nlattr.c``: it packs messages the way the
kernel does (``nlmsg_put``, ``genlmsg_put``, ``nla_put``, ``nla_nest_start``)
and validates requests the way ``genl_family_rcv_msg_attrs_parse`` does with
the strict validation that YNL-generated families get:

* ``NL_VALIDATE_STRICT``: trailing bytes, an attribute type above the op's
  ``maxattr``, an attribute whose policy type is NLA_UNSPEC, a fixed-size
  attribute of the wrong length, all give ``-EINVAL``.
* ``NLA_POLICY_MAX``: a u32 above the maximum gives ``-EINVAL``.
* An error reply (``netlink_ack``) echoes the whole request unless the error
  is 0 (an ACK), in which case only the request header is echoed and
  ``NLM_F_CAPPED`` is set.

Nothing here does I/O. It never imports ``tlshd``: the agent's codec and this
one are written independently so each checks the other.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
NLA_HDR = struct.Struct("=HH")  # len, type
NLMSG_HDRLEN = NLMSG_HDR.size
GENL_HDRLEN = GENL_HDR.size
NLA_HDRLEN = NLA_HDR.size

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_CAPPED = 0x100

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

GENL_ID_CTRL = 0x10
CTRL_VERSION = 2
CTRL_CMD_NEWFAMILY = 1
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_HDRSIZE = 4
CTRL_ATTR_MAXATTR = 5
CTRL_ATTR_OPS = 6
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_CMD_GETPOLICY = 10  # dump only (ctrl_dumppolicy), Linux 5.10
CTRL_ATTR_POLICY = 8
CTRL_ATTR_OP_POLICY = 9
CTRL_ATTR_OP = 10
CTRL_ATTR_POLICY_DO = 1
NL_POLICY_TYPE_ATTR_TYPE = 1
NL_POLICY_TYPE_ATTR_MAX_VALUE_U = 5
# enum netlink_attribute_type for the kinds of AttrPolicy (NLA_NUL_STRING for 'string')
NL_ATTR_TYPES = {"u16": 3, "u32": 4, "s32": 8, "string": 12, "nested": 13}
NLM_F_DUMP = 0x300
CTRL_ATTR_OP_ID = 1
CTRL_ATTR_OP_FLAGS = 2
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
GENL_ADMIN_PERM = 0x01
GENL_CMD_CAP_DO = 0x02


class NetlinkError(Exception):
    """A negative-errno outcome of processing a request (what ``doit`` returns)."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(f"{errno.errorcode.get(err, err)}: {why}")
        self.errno = err


def _align(n: int) -> int:
    return (n + 3) & ~3


# --- packing -----------------------------------------------------------------


def nla(attr_type: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One attribute: header with the unpadded length, payload, padding to 4."""
    length = NLA_HDRLEN + len(payload)
    flags = NLA_F_NESTED if nested else 0
    return NLA_HDR.pack(length, attr_type | flags) + payload + b"\0" * (_align(length) - length)


def nla_u16(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("=H", value))


def nla_u32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("=I", value & 0xFFFFFFFF))


def nla_s32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("=i", value))


def nla_string(attr_type: int, value: str) -> bytes:
    """``nla_put_string``: the length includes the trailing NUL."""
    return nla(attr_type, value.encode() + b"\0")


def nla_nest(attr_type: int, children: Iterable[bytes], *, flag: bool = True) -> bytes:
    """``nla_nest_start`` sets NLA_F_NESTED; ``nla_nest_start_noflag`` (nlctrl) does not."""
    return nla(attr_type, b"".join(children), nested=flag)


def genlmsg(
    family_id: int, cmd: int, version: int, attrs: bytes, *, seq: int = 0, pid: int = 0,
    flags: int = 0,
) -> bytes:
    """``genlmsg_put`` + ``genlmsg_end``."""
    body = GENL_HDR.pack(cmd, version, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDRLEN + len(body), family_id, flags, seq, pid) + body


def nlmsg_error(err: int, request: bytes, *, portid: int) -> bytes:
    """``netlink_ack``: error (<= 0) then the request (whole, or capped to its header)."""
    length, _type, _flags, seq, _pid = NLMSG_HDR.unpack_from(request)
    if err:
        echoed, flags = request[:length], 0
    else:
        echoed, flags = request[:NLMSG_HDRLEN], NLM_F_CAPPED
    payload = struct.pack("=i", err) + echoed
    return NLMSG_HDR.pack(NLMSG_HDRLEN + len(payload), NLMSG_ERROR, flags, seq, portid) + payload


# --- parsing -----------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    length: int
    type: int
    flags: int
    seq: int
    pid: int


@dataclass(frozen=True)
class GenlMessage:
    """One received generic netlink request, header and raw attribute area."""

    header: Header
    cmd: int
    version: int
    attr_data: bytes
    raw: bytes


def split_messages(data: bytes) -> Iterator[bytes]:
    """``netlink_rcv_skb``: walk the messages in one datagram; a bad length ends the walk."""
    offset = 0
    while len(data) - offset >= NLMSG_HDRLEN:
        length = NLMSG_HDR.unpack_from(data, offset)[0]
        if length < NLMSG_HDRLEN or length > len(data) - offset:
            return
        yield data[offset : offset + length]
        offset += _align(length)


def parse_header(msg: bytes) -> Header:
    return Header(*NLMSG_HDR.unpack_from(msg))


def parse_genl(msg: bytes) -> GenlMessage:
    """Split header, genl header and attributes; short messages are -EINVAL."""
    header = parse_header(msg)
    if header.length < NLMSG_HDRLEN + GENL_HDRLEN:
        raise NetlinkError(-errno.EINVAL, "message shorter than the genl header")
    cmd, version, _ = GENL_HDR.unpack_from(msg, NLMSG_HDRLEN)
    return GenlMessage(header, cmd, version, msg[NLMSG_HDRLEN + GENL_HDRLEN : header.length], msg)


def iter_attrs(data: bytes, *, strict: bool = True) -> Iterator[tuple[int, int, bytes]]:
    """Yield (masked type, raw type, payload). Strict: trailing garbage is -EINVAL."""
    offset = 0
    while len(data) - offset >= NLA_HDRLEN:
        length, raw_type = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDRLEN or length > len(data) - offset:
            break
        yield raw_type & NLA_TYPE_MASK, raw_type, data[offset + NLA_HDRLEN : offset + length]
        offset += _align(length)
    if strict and offset < len(data):
        raise NetlinkError(-errno.EINVAL, f"{len(data) - offset} trailing bytes after attributes")


# --- policies (lib/nlattr.c) -----------------------------------------------------


@dataclass(frozen=True)
class AttrPolicy:
    """A ``struct nla_policy`` entry: kind 'u32' | 's32' | 'u16' | 'string' | 'nested'."""

    kind: str
    max_value: int | None = None
    max_len: int | None = None  # a string's .len: at most this many bytes before its NUL


_FIXED_SIZES = {"u16": 2, "u32": 4, "s32": 4}


@dataclass(frozen=True)
class OpPolicy:
    """A genl op: its ``maxattr``, per-attribute policy, flags."""

    maxattr: int
    attrs: Mapping[int, AttrPolicy] = field(default_factory=dict)
    admin_perm: bool = False


def validate_attrs(data: bytes, policy: OpPolicy) -> dict[int, list[bytes]]:
    """Strict ``nla_parse``: returns every occurrence of each attribute, in order."""
    parsed: dict[int, list[bytes]] = {}
    for attr_type, raw_type, payload in iter_attrs(data):
        if attr_type == 0 or attr_type > policy.maxattr:
            raise NetlinkError(-errno.EINVAL, f"attribute {attr_type} above maxattr")
        pol = policy.attrs.get(attr_type)
        if pol is None:
            raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: unsupported (NLA_UNSPEC)")
        _check_attr(attr_type, raw_type, payload, pol)
        parsed.setdefault(attr_type, []).append(payload)
    return parsed


def _check_attr(attr_type: int, raw_type: int, payload: bytes, pol: AttrPolicy) -> None:
    size = _FIXED_SIZES.get(pol.kind)
    if size is not None and len(payload) != size:
        raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: length {len(payload)}")
    if pol.kind == "nested" and not raw_type & NLA_F_NESTED:
        raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: NLA_F_NESTED missing")
    if pol.kind == "string" and (not payload or b"\0" in payload[:-1]):
        raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: bad string")
    if pol.max_len is not None and len(payload.rstrip(b"\0")) > pol.max_len:
        raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: longer than {pol.max_len}")
    if pol.max_value is not None and get_u32(payload) > pol.max_value:
        raise NetlinkError(-errno.EINVAL, f"attribute {attr_type}: above {pol.max_value}")


def get_u32(payload: bytes) -> int:
    return int(struct.unpack("=I", payload[:4])[0])


def get_s32(payload: bytes) -> int:
    return int(struct.unpack("=i", payload[:4])[0])


def get_string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- nlctrl ----------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyDesc:
    """What ``ctrl_fill_info`` reports about a registered family."""

    name: str
    family_id: int
    version: int
    maxattr: int
    ops: Mapping[int, OpPolicy]
    mcast_groups: tuple[tuple[str, int], ...]  # (name, id) in group-index order


CTRL_GETFAMILY_POLICY = OpPolicy(
    maxattr=CTRL_ATTR_MCAST_GROUPS,
    attrs={
        CTRL_ATTR_FAMILY_ID: AttrPolicy("u16"),
        CTRL_ATTR_FAMILY_NAME: AttrPolicy("string"),
    },
)


def ctrl_family_reply(desc: FamilyDesc, *, seq: int, portid: int) -> bytes:
    """CTRL_CMD_NEWFAMILY reply in ``ctrl_fill_info`` order (nests without NLA_F_NESTED)."""
    ops = [
        nla_nest(i, [nla_u32(CTRL_ATTR_OP_ID, op_id), nla_u32(CTRL_ATTR_OP_FLAGS, _op_flags(op))],
                 flag=False)
        for i, (op_id, op) in enumerate(sorted(desc.ops.items()), start=1)
    ]
    groups = [
        nla_nest(i, [nla_u32(CTRL_ATTR_MCAST_GRP_ID, gid), nla_string(CTRL_ATTR_MCAST_GRP_NAME, n)],
                 flag=False)
        for i, (n, gid) in enumerate(desc.mcast_groups, start=1)
    ]
    attrs = b"".join([
        nla_string(CTRL_ATTR_FAMILY_NAME, desc.name),
        nla_u16(CTRL_ATTR_FAMILY_ID, desc.family_id),
        nla_u32(CTRL_ATTR_VERSION, desc.version),
        nla_u32(CTRL_ATTR_HDRSIZE, 0),
        nla_u32(CTRL_ATTR_MAXATTR, desc.maxattr),
        nla_nest(CTRL_ATTR_OPS, ops, flag=False),
        nla_nest(CTRL_ATTR_MCAST_GROUPS, groups, flag=False) if groups else b"",
    ])
    return genlmsg(GENL_ID_CTRL, CTRL_CMD_NEWFAMILY, CTRL_VERSION, attrs, seq=seq, pid=portid)


CTRL_GETPOLICY_POLICY = OpPolicy(
    maxattr=CTRL_ATTR_OP,
    attrs={
        CTRL_ATTR_FAMILY_ID: AttrPolicy("u16"),
        CTRL_ATTR_FAMILY_NAME: AttrPolicy("string"),
        CTRL_ATTR_OP: AttrPolicy("u32"),
    },
)


def ctrl_policy_dump(msg: GenlMessage, families: Iterable[FamilyDesc], *, portid: int) -> bytes:
    """``ctrl_dumppolicy``: a message per op (CTRL_ATTR_OP_POLICY: the index of its "do"
    policy), then one per policy attribute (CTRL_ATTR_POLICY: index > attribute > type, and
    the maximum where the policy has one), then NLMSG_DONE; all NLM_F_MULTI. Only as a dump:
    the op has no ``doit`` (EOPNOTSUPP otherwise). CTRL_ATTR_OP narrows it to one op."""
    if msg.header.flags & NLM_F_DUMP != NLM_F_DUMP:
        raise NetlinkError(-errno.EOPNOTSUPP, "GETPOLICY is a dump")
    attrs = validate_attrs(msg.attr_data, CTRL_GETPOLICY_POLICY)
    desc = _find_family(attrs, families)
    ops = sorted(desc.ops.items())
    if CTRL_ATTR_OP in attrs:
        wanted = get_u32(attrs[CTRL_ATTR_OP][0])
        ops = [(op_id, op) for op_id, op in ops if op_id == wanted]
        if not ops:
            raise NetlinkError(-errno.ENOENT, f"no op {wanted}")
    seq, family = msg.header.seq, nla_u16(CTRL_ATTR_FAMILY_ID, desc.family_id)

    def part(body: bytes) -> bytes:
        return genlmsg(GENL_ID_CTRL, CTRL_CMD_GETPOLICY, CTRL_VERSION, family + body, seq=seq,
                       pid=portid, flags=NLM_F_MULTI)

    out = [part(nla_nest(CTRL_ATTR_OP_POLICY, [nla_nest(op_id, [
        nla_u32(CTRL_ATTR_POLICY_DO, index)])])) for index, (op_id, _) in enumerate(ops)]
    for index, (_, op) in enumerate(ops):
        for attr_type, pol in sorted(op.attrs.items()):
            desc_attrs = [nla_u32(NL_POLICY_TYPE_ATTR_TYPE, NL_ATTR_TYPES[pol.kind])]
            if pol.max_value is not None:
                desc_attrs.append(nla(NL_POLICY_TYPE_ATTR_MAX_VALUE_U,
                                      struct.pack("=Q", pol.max_value)))
            out.append(part(nla_nest(CTRL_ATTR_POLICY, [nla_nest(index, [
                nla_nest(attr_type, desc_attrs)])])))
    done = NLMSG_HDR.pack(NLMSG_HDRLEN + 4, NLMSG_DONE, NLM_F_MULTI, seq, portid)
    return b"".join(out) + done + struct.pack("=i", 0)


def _find_family(attrs: dict[int, list[bytes]], families: Iterable[FamilyDesc]) -> FamilyDesc:
    for desc in families:
        if CTRL_ATTR_FAMILY_ID in attrs and desc.family_id == struct.unpack(
                "=H", attrs[CTRL_ATTR_FAMILY_ID][0])[0]:
            return desc
        if CTRL_ATTR_FAMILY_NAME in attrs and desc.name == get_string(
                attrs[CTRL_ATTR_FAMILY_NAME][0]):
            return desc
    if CTRL_ATTR_FAMILY_ID not in attrs and CTRL_ATTR_FAMILY_NAME not in attrs:
        raise NetlinkError(-errno.EINVAL, "no family id or name")
    raise NetlinkError(-errno.ENOENT, "no such family")


def _op_flags(op: OpPolicy) -> int:
    return GENL_CMD_CAP_DO | (GENL_ADMIN_PERM if op.admin_perm else 0)


def ctrl_lookup(msg: GenlMessage, families: Iterable[FamilyDesc]) -> FamilyDesc:
    """``ctrl_getfamily``: by FAMILY_ID or FAMILY_NAME, else -EINVAL / -ENOENT."""
    if msg.cmd != CTRL_CMD_GETFAMILY:
        raise NetlinkError(-errno.EOPNOTSUPP, f"nlctrl command {msg.cmd}")
    attrs = validate_attrs(msg.attr_data, CTRL_GETFAMILY_POLICY)
    return _find_family(attrs, families)
