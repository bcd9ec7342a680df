"""Encode the agent's requests and decode what the kernel sends back.

Theory of operation
-------------------
This module is pure: bytes in, bytes or typed values out. The socket lives
in ``tlshd.upcall``. Netlink is in host byte order, so all ``struct`` formats
use ``=`` (native order, standard sizes), like pyroute2.

The four messages of every request (READY, the ACCEPT request and reply, DONE)
and kernel-sim's SETSOCKOPT are packed and read here with ``struct``, without
pyroute2's generic machinery (with the kTLS batch, a quarter of the agent's
CPU per handshake side: docs/performance.md).
pyroute2's message classes (``spec.CtrlMsg``, ``spec.AcceptMsg``, ...) stay the
single declaration of the attribute sets: the strict rules below are derived
from them, pyroute2 packs the requests that are not on the hot path (nlctrl,
group membership) and reads nlctrl's family reply, and the tests prove that
the direct encoders give pyroute2's bytes and the direct decoders its values.
Arguments are range-checked first, so the kernel never gets a value its policy
would reject (``ValueError`` otherwise).

Decoding has two layers, because pyroute2 is lenient: it clamps attribute
lengths that run past their container, reads strings with or without a
NUL, ignores stray bytes and returns whatever it got.

1. Strict checks, our own. Each ``nlmsghdr`` is framed (at least 16 bytes,
   no longer than what is left). In the messages we interpret, each attribute
   must have a length of at least 4 that stays inside its container. Its
   payload must fit the rule for its type, and those rules are derived from
   the same pyroute2 declarations (``_rules_of``):
   - u32 payloads are exactly 4 bytes, u16 payloads exactly 2;
   - strings end in their only NUL and are UTF-8;
   - nests are entered only where the spec has a nest, at most
     ``_MAX_DEPTH`` levels deep;
   - NLA_F_NESTED on a scalar is rejected (the kernel's strict validation
     does the same);
   - a single-valued attribute may not repeat.
   Types are masked with NLA_TYPE_MASK. Unknown attribute types are skipped
   and reported, never entered. Failures raise ``DecodeError`` with the byte
   offset in the buffer given to ``decode``.
2. The values are then read out of the checked bytes (nlctrl's family reply
   through pyroute2) and copied into the frozen dataclasses of
   ``tlshd.netlink.messages``. No pyroute2 object leaves this module.

NLMSG_ERROR is a fixed C struct (``struct nlmsgerr``), so ``struct`` reads it.
Its optional extended-ack TLVs go through the same strict checks.

One recv() buffer may hold several messages; ``decode`` returns them all in
order. The kernel sends an ACCEPT reply as its own datagram, and that reply
has already put a socket fd into our fd table. So if the reply is malformed,
the ``AcceptDecodeError`` raised still carries that fd when it could be read,
and the caller can answer DONE and close it instead of leaking it.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from tlshd.errors import DecodeError
from tlshd.netlink import spec
from tlshd.netlink.messages import (
    AcceptReply,
    Ack,
    DumpDone,
    ErrorReply,
    FamilyInfo,
    Header,
    Message,
    PolicyPart,
    Ready,
    Unknown,
    X509Serials,
)
from tlshd.netlink.spec import HandlerClass

__all__ = ["AcceptDecodeError", "decode", "encode_accept", "encode_done", "encode_get_family",
           "encode_get_policy"]

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_NLA_U32 = struct.Struct("=HHI")
_NLA_S32 = struct.Struct("=HHi")

_MAX_DEPTH = 2  # nlctrl: MCAST_GROUPS > entry > NAME/ID; handshake: CERTIFICATE > CERT
_MAX_FD = 2**31 - 1
_U32_MAX = 2**32 - 1
_U16_MAX = 2**16 - 1


class AcceptDecodeError(DecodeError):
    """A malformed ACCEPT reply.

    ``sockfd`` is the fd the kernel installed in our table, or None if it could
    not be read. The caller owns it: send DONE with ``status`` and close it.
    """

    def __init__(self, message: str, *, sockfd: int | None) -> None:
        super().__init__(message)
        self.sockfd = sockfd


# --- strict rules derived from the declarations -------------------------------


class _Kind(Enum):
    U16 = "uint16"
    U32 = "uint32"
    STRING = "asciiz"
    OPAQUE = "none"  # known, not interpreted: any payload, any flags
    NEST = "nest"
    ARRAY = "array"  # a nest of indexed nests (pyroute2 "*class")


_SIZES = {_Kind.U16: 2, _Kind.U32: 4}
_SCALAR_KINDS = {"uint16": _Kind.U16, "uint32": _Kind.U32, "asciiz": _Kind.STRING}


@dataclass(frozen=True)
class _Rule:
    name: str
    kind: _Kind
    multi: bool
    inner: Mapping[int, _Rule]  # attributes of a NEST, or of each ARRAY entry


def _rules_of(decl: Any) -> Mapping[int, _Rule]:
    """Read a pyroute2-style ``nla_map`` into strict checking rules."""
    multi: frozenset[int] = getattr(decl, "multi_attrs", frozenset())
    rules: dict[int, _Rule] = {}
    for number, name, kind_spec in decl.nla_map:
        base = str(kind_spec).lstrip("*").split("|")[0]
        inner: Mapping[int, _Rule] = {}
        if base == "none":
            kind = _Kind.OPAQUE
        elif base in _SCALAR_KINDS:
            kind = _SCALAR_KINDS[base]
        else:
            kind = _Kind.ARRAY if str(kind_spec).startswith("*") else _Kind.NEST
            inner = _rules_of(getattr(decl, base))
        rules[int(number)] = _Rule(str(name), kind, number in multi, MappingProxyType(inner))
    return MappingProxyType(rules)


_ACCEPT_RULES = _rules_of(spec.AcceptMsg)
_CTRL_RULES = _rules_of(spec.CtrlMsg)
_EXT_ACK_RULES = _rules_of(spec.ExtAckAttrs)


# --- framing -------------------------------------------------------------------


def _align(length: int, to: int = spec.NLA_ALIGNTO) -> int:
    return (length + to - 1) & ~(to - 1)


@dataclass(frozen=True)
class _Frame:
    """One netlink message inside the buffer: data[start:end]."""

    header: Header
    start: int
    end: int

    @property
    def attrs(self) -> int:
        """Offset of the first attribute of a generic netlink message."""
        return self.start + spec.NLMSG_HDRLEN + spec.GENL_HDRLEN


def _frames(data: bytes) -> Iterator[_Frame]:
    offset = 0
    while offset < len(data):
        left = len(data) - offset
        if left < spec.NLMSG_HDRLEN:
            raise DecodeError(f"{left} stray bytes at offset {offset}, too short for an nlmsghdr")
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < spec.NLMSG_HDRLEN:
            raise DecodeError(f"nlmsg_len {length} < {spec.NLMSG_HDRLEN} at offset {offset}")
        if length > left:
            raise DecodeError(
                f"nlmsg_len {length} at offset {offset} exceeds the {left} bytes left"
            )
        yield _Frame(Header(msg_type, flags, seq, pid), offset, offset + length)
        offset += _align(length, spec.NLMSG_ALIGNTO)


class _Attr(NamedTuple):
    type: int  # masked with NLA_TYPE_MASK
    nested: bool  # NLA_F_NESTED was set
    offset: int  # of the nlattr header
    start: int  # payload, unpadded
    end: int


def _walk(data: bytes, start: int, end: int) -> Iterator[_Attr]:
    """Frame the attributes in data[start:end]; the last may lack its padding."""
    offset = start
    while offset < end:
        left = end - offset
        if left < spec.NLA_HDRLEN:
            raise DecodeError(f"{left} stray bytes at offset {offset}, too short for an nlattr")
        length, raw_type = _NLATTR.unpack_from(data, offset)
        attr_type = raw_type & spec.NLA_TYPE_MASK
        if length < spec.NLA_HDRLEN:
            raise DecodeError(f"attribute {attr_type} at offset {offset} has length {length} < 4")
        if length > left:
            raise DecodeError(
                f"attribute {attr_type} at offset {offset} has length {length}, "
                f"past the end of its container ({left} bytes left)"
            )
        yield _Attr(
            attr_type, bool(raw_type & spec.NLA_F_NESTED), offset, offset + 4, offset + length
        )
        offset += _align(length)


# --- strict attribute checks -------------------------------------------------------


def _check(data: bytes, start: int, end: int, rules: Mapping[int, _Rule], depth: int) -> list[int]:
    """Check data[start:end] against ``rules``; return unknown types, first-seen order."""
    seen: set[int] = set()
    unknown: list[int] = []
    for attr in _walk(data, start, end):
        rule = rules.get(attr.type)
        if rule is None:
            if attr.type not in unknown:
                unknown.append(attr.type)
            continue
        if attr.type in seen and not rule.multi:
            raise DecodeError(f"{rule.name} repeated at offset {attr.offset}")
        seen.add(attr.type)
        _check_attr(data, attr, rule, depth)
    return unknown


def _check_attr(data: bytes, attr: _Attr, rule: _Rule, depth: int) -> None:
    where = f"{rule.name} at offset {attr.offset}"
    size = attr.end - attr.start
    if rule.kind in _SIZES:
        if attr.nested:
            raise DecodeError(
                f"{where} is a scalar flagged spec.NLA_F_NESTED: deeper than the spec"
            )
        if size != _SIZES[rule.kind]:
            raise DecodeError(f"{where} has a {size}-byte payload, expected {_SIZES[rule.kind]}")
    elif rule.kind is _Kind.STRING:
        if attr.nested:
            raise DecodeError(
                f"{where} is a string flagged spec.NLA_F_NESTED: deeper than the spec"
            )
        _check_string(data, attr, where)
    elif rule.kind is _Kind.NEST:
        if depth + 1 > _MAX_DEPTH:
            raise DecodeError(f"{where}: nesting deeper than {_MAX_DEPTH} levels")
        _check(data, attr.start, attr.end, rule.inner, depth + 1)
    elif rule.kind is _Kind.ARRAY:
        if depth + 2 > _MAX_DEPTH:
            raise DecodeError(f"{where}: nesting deeper than {_MAX_DEPTH} levels")
        for entry in _walk(data, attr.start, attr.end):
            _check(data, entry.start, entry.end, rule.inner, depth + 2)


def _check_string(data: bytes, attr: _Attr, where: str) -> None:
    payload = data[attr.start : attr.end]
    if not payload or payload[-1] != 0:
        raise DecodeError(f"{where} is not NUL-terminated")
    if 0 in payload[:-1]:
        raise DecodeError(f"{where} has a NUL before its end")
    try:
        payload[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{where} is not UTF-8 (byte {exc.start})") from exc


# --- reading values through pyroute2 ----------------------------------------------


def _pyroute2_decode(cls: Any, data: bytes, frame: _Frame) -> Any:
    msg = cls(data[frame.start : frame.end])
    try:
        msg.decode()
    except Exception as exc:  # pyroute2 raises assorted types; our checks ran first
        raise DecodeError(
            f"pyroute2 failed on the message at offset {frame.start}: {exc!r}"
        ) from exc
    return msg


def _required_attr(msg: Any, name: str, frame: _Frame) -> Any:
    value = msg.get_attr(name)
    if value is None:
        raise DecodeError(f"{name} missing from the message at offset {frame.start}")
    return value


def _required(values: Mapping[int, int], attr_type: int, rules: Mapping[int, _Rule],
              frame: _Frame) -> int:
    value = values.get(attr_type)
    if value is None:
        raise DecodeError(f"{rules[attr_type].name} missing from the message at offset "
                          f"{frame.start}")
    return value


_E = TypeVar("_E", bound=IntEnum)


def _enum(cls: type[_E], value: int, name: str, frame: _Frame) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise DecodeError(
            f"{name} {value} in the message at offset {frame.start} is not a known {cls.__name__}"
        ) from None


# --- decoding --------------------------------------------------------------------


def decode(data: bytes, family_id: int | None) -> list[Message]:
    """Decode every netlink message in one recv() buffer.

    ``family_id`` is the resolved ID of the ``handshake`` family, or None
    before it is known (handshake messages then come back as ``Unknown``).
    Raises ``DecodeError`` (``AcceptDecodeError`` for an ACCEPT reply) on
    malformed input, and nothing else.
    """
    if family_id is not None:
        _check_family_id(family_id)
    buf = bytes(data)
    return [_decode_one(buf, frame, family_id) for frame in _frames(buf)]


def _decode_one(data: bytes, frame: _Frame, family_id: int | None) -> Message:
    header = frame.header
    if header.type == spec.NLMSG_ERROR:
        return _decode_error(data, frame)
    if header.type == spec.NLMSG_DONE:
        return DumpDone(header)
    if header.type not in (spec.GENL_ID_CTRL, family_id):
        return Unknown(header)
    if frame.end - frame.start < spec.NLMSG_HDRLEN + spec.GENL_HDRLEN:
        raise DecodeError(f"generic netlink message at offset {frame.start} has no genlmsghdr")
    cmd, _version, _reserved = _GENLMSGHDR.unpack_from(data, frame.start + spec.NLMSG_HDRLEN)
    if header.type == spec.GENL_ID_CTRL:
        if cmd == spec.CTRL_CMD_GETPOLICY:
            return _decode_policy(data, frame)
        return _decode_family(data, frame) if cmd == spec.CTRL_CMD_NEWFAMILY else Unknown(header)
    if cmd == spec.HandshakeCmd.READY:
        return _decode_ready(data, frame)
    if cmd == spec.HandshakeCmd.ACCEPT:
        return _decode_accept(data, frame)
    return Unknown(header)


def _decode_family(data: bytes, frame: _Frame) -> FamilyInfo:
    _check(data, frame.attrs, frame.end, _CTRL_RULES, 0)
    msg = _pyroute2_decode(spec.CtrlMsg, data, frame)
    groups: dict[str, int] = {}
    for entry in msg.get_attr("CTRL_ATTR_MCAST_GROUPS") or ():
        name = _required_attr(entry, "CTRL_ATTR_MCAST_GRP_NAME", frame)
        if name in groups:
            raise DecodeError(f"multicast group {name!r} listed twice at offset {frame.start}")
        groups[str(name)] = int(_required_attr(entry, "CTRL_ATTR_MCAST_GRP_ID", frame))
    return FamilyInfo(
        header=frame.header,
        name=str(_required_attr(msg, "CTRL_ATTR_FAMILY_NAME", frame)),
        family_id=int(_required_attr(msg, "CTRL_ATTR_FAMILY_ID", frame)),
        version=int(_required_attr(msg, "CTRL_ATTR_VERSION", frame)),
        mcast_groups=MappingProxyType(groups),
    )


def _decode_policy(data: bytes, frame: _Frame) -> PolicyPart:
    """One GETPOLICY dump message. Only FAMILY_ID, OP_POLICY > op > DO and POLICY > index >
    attribute > TYPE are read; other descriptors (bounds, lengths) are skipped, and an
    attribute without a TYPE is not listed."""
    family_id, ops, attrs = None, [], []
    for attr in _walk(data, frame.attrs, frame.end):
        if attr.type == spec.CtrlAttr.FAMILY_ID:
            family_id = _u(data, attr, 2)
        elif attr.type == spec.CtrlAttr.OP_POLICY:
            for op in _walk(data, attr.start, attr.end):
                for entry in _walk(data, op.start, op.end):
                    if entry.type == spec.CTRL_ATTR_POLICY_DO:
                        ops.append((op.type, _u(data, entry, 4)))
        elif attr.type == spec.CtrlAttr.POLICY:
            for policy in _walk(data, attr.start, attr.end):
                for member in _walk(data, policy.start, policy.end):
                    kinds = [_u(data, d, 4) for d in _walk(data, member.start, member.end)
                             if d.type == spec.NL_POLICY_TYPE_ATTR_TYPE]
                    if kinds:
                        attrs.append((policy.type, member.type, kinds[0]))
    if family_id is None:
        raise DecodeError(f"GETPOLICY message at offset {frame.start} without a family ID")
    return PolicyPart(frame.header, family_id, tuple(ops), tuple(attrs))


def _u(data: bytes, attr: _Attr, size: int) -> int:
    if attr.end - attr.start != size:
        raise DecodeError(f"attribute {attr.type} at offset {attr.offset} has "
                          f"{attr.end - attr.start} bytes, not {size}")
    return int.from_bytes(data[attr.start:attr.end], sys.byteorder)  # host order, as netlink


def _decode_ready(data: bytes, frame: _Frame) -> Ready:
    _check(data, frame.attrs, frame.end, _ACCEPT_RULES, 0)
    values = _scalars(data, frame.attrs, frame.end, _ACCEPT_RULES)
    value = _required(values, spec.AcceptAttr.HANDLER_CLASS, _ACCEPT_RULES, frame)
    try:
        return Ready(frame.header, HandlerClass(value))
    except ValueError:
        return Ready(frame.header, value)  # a class we do not serve: not malformed


def _decode_accept(data: bytes, frame: _Frame) -> AcceptReply:
    sockfd = _peek_sockfd(data, frame)
    try:
        return _decode_accept_strictly(data, frame)
    except DecodeError as exc:
        raise AcceptDecodeError(f"ACCEPT reply: {exc}", sockfd=sockfd) from exc


def _peek_sockfd(data: bytes, frame: _Frame) -> int | None:
    """The first well-formed SOCKFD before any framing error; never raises."""
    try:
        for attr in _walk(data, frame.attrs, frame.end):
            if attr.type == spec.AcceptAttr.SOCKFD and attr.end - attr.start == _U32.size:
                (fd,) = _U32.unpack_from(data, attr.start)
                return int(fd) if fd <= _MAX_FD else None
    except DecodeError:
        pass
    return None


def _decode_accept_strictly(data: bytes, frame: _Frame) -> AcceptReply:
    unknown = _check(data, frame.attrs, frame.end, _ACCEPT_RULES, 0)
    values: dict[int, int] = {}
    peername: str | None = None
    identities: list[int] = []
    certificate: X509Serials | None = None
    for attr in _walk(data, frame.attrs, frame.end):  # one pass: _check vouched for the shapes
        rule = _ACCEPT_RULES.get(attr.type)
        if attr.type == spec.AcceptAttr.PEER_IDENTITY:
            identities.append(_U32.unpack_from(data, attr.start)[0])
        elif rule is not None and rule.kind is _Kind.U32:
            values.setdefault(attr.type, _U32.unpack_from(data, attr.start)[0])
        elif attr.type == spec.AcceptAttr.PEERNAME:
            peername = data[attr.start : attr.end - 1].decode("utf-8")  # checked: one NUL
        elif attr.type == spec.AcceptAttr.CERTIFICATE:
            certificate = _certificate(data, attr, frame)
    sockfd = _required(values, spec.AcceptAttr.SOCKFD, _ACCEPT_RULES, frame)
    if sockfd > _MAX_FD:
        raise DecodeError(f"SOCKFD {sockfd} at offset {frame.start} is not a file descriptor")
    message_type = _required(values, spec.AcceptAttr.MESSAGE_TYPE, _ACCEPT_RULES, frame)
    auth_mode = _required(values, spec.AcceptAttr.AUTH_MODE, _ACCEPT_RULES, frame)
    return AcceptReply(
        header=frame.header,
        sockfd=sockfd,
        message_type=_enum(spec.MsgType, message_type, "MESSAGE_TYPE", frame),
        auth_mode=_enum(spec.AuthMode, auth_mode, "AUTH_MODE", frame),
        peername=peername,
        timeout_ms=values.get(spec.AcceptAttr.TIMEOUT),
        keyring=values.get(spec.AcceptAttr.KEYRING),
        peer_identities=tuple(identities),
        certificate=certificate,
        unknown_attrs=tuple(unknown),
    )


def _scalars(data: bytes, start: int, end: int, rules: Mapping[int, _Rule]) -> dict[int, int]:
    """The u32 attributes of ``rules`` in data[start:end], by type: the first of each.
    Call after ``_check``, which made sure each is 4 bytes and only multi-attrs repeat."""
    values: dict[int, int] = {}
    for attr in _walk(data, start, end):
        rule = rules.get(attr.type)
        if rule is not None and rule.kind is _Kind.U32 and attr.type not in values:
            values[attr.type] = _U32.unpack_from(data, attr.start)[0]
    return values


def _certificate(data: bytes, nest: _Attr, frame: _Frame) -> X509Serials:
    # tls_handshake_put_certificate() always puts both CERT and PRIVKEY.
    rules = _ACCEPT_RULES[spec.AcceptAttr.CERTIFICATE].inner
    values = _scalars(data, nest.start, nest.end, rules)
    return X509Serials(cert=_required(values, spec.X509Attr.CERT, rules, frame),
                       privkey=_required(values, spec.X509Attr.PRIVKEY, rules, frame))


def _decode_error(data: bytes, frame: _Frame) -> Ack | ErrorReply:
    body = frame.start + spec.NLMSG_HDRLEN
    if frame.end - body < _S32.size + spec.NLMSG_HDRLEN:
        raise DecodeError(
            f"NLMSG_ERROR at offset {frame.start} is too short for an error code "
            f"and the offending nlmsghdr"
        )
    (error,) = _S32.unpack_from(data, body)
    inner = body + _S32.size
    inner_len, inner_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, inner)
    if not -spec.MAX_ERRNO <= error <= 0:
        raise DecodeError(f"NLMSG_ERROR at offset {frame.start} carries error {error}")
    message = None
    if frame.header.flags & spec.NLM_F_ACK_TLVS:
        message = _ext_ack_message(data, frame, inner, inner_len)
    if error == 0:
        return Ack(frame.header)
    return ErrorReply(frame.header, errno=-error, offending_type=inner_type, message=message)


def _ext_ack_message(data: bytes, frame: _Frame, inner: int, inner_len: int) -> str | None:
    """NLMSGERR_ATTR_MSG from the TLVs after the (possibly capped) request."""
    if frame.header.flags & spec.NLM_F_CAPPED:
        tlvs = inner + spec.NLMSG_HDRLEN
    elif spec.NLMSG_HDRLEN <= inner_len <= frame.end - inner:
        tlvs = min(inner + _align(inner_len, spec.NLMSG_ALIGNTO), frame.end)
    else:
        raise DecodeError(f"offending message at offset {inner} has bad nlmsg_len {inner_len}")
    _check(data, tlvs, frame.end, _EXT_ACK_RULES, 0)
    for attr in _walk(data, tlvs, frame.end):
        if attr.type == spec.NlmsgerrAttr.MSG:
            return data[attr.start : attr.end - 1].decode("utf-8")
    return None


# --- encoding --------------------------------------------------------------------


def encode_get_family(name: str, seq: int) -> bytes:
    """CTRL_CMD_GETFAMILY for ``name``, to nlctrl; the reply is a FamilyInfo."""
    if not name or len(name) >= spec.GENL_NAMSIZ or not name.isascii() or "\0" in name:
        raise ValueError(f"not a generic netlink family name: {name!r}")
    return _encode(
        spec.CtrlMsg,
        nlmsg=(spec.GENL_ID_CTRL, spec.NLM_F_REQUEST, seq),
        genl=(spec.CTRL_CMD_GETFAMILY, spec.CTRL_REQUEST_VERSION),
        attrs=[("CTRL_ATTR_FAMILY_NAME", name)],
    )


def encode_get_policy(family_id: int, seq: int) -> bytes:
    """CTRL_CMD_GETPOLICY for one family, a dump: PolicyPart messages, then DumpDone."""
    _check_family_id(family_id)
    return _encode(
        spec.CtrlMsg,
        nlmsg=(spec.GENL_ID_CTRL, spec.NLM_F_REQUEST | spec.NLM_F_DUMP, seq),
        genl=(spec.CTRL_CMD_GETPOLICY, spec.CTRL_REQUEST_VERSION),
        attrs=[("CTRL_ATTR_FAMILY_ID", family_id)],
    )


def encode_accept(
    family_id: int, seq: int, handler_class: HandlerClass = HandlerClass.TLSHD
) -> bytes:
    """HANDSHAKE_CMD_ACCEPT. No NLM_F_ACK: success yields only the reply."""
    _check_family_id(family_id)
    return _message(family_id, spec.NLM_F_REQUEST, seq, spec.HandshakeCmd.ACCEPT,
                    spec.FAMILY_VERSION,
                    _nla_u32(spec.AcceptAttr.HANDLER_CLASS, int(HandlerClass(handler_class))))


def encode_done(
    family_id: int, seq: int, status: int, sockfd: int, remote_auth: Sequence[int] = (),
    tags: Sequence[str] = (),
) -> bytes:
    """HANDSHAKE_CMD_DONE with NLM_F_ACK, so success is confirmed by an Ack.

    ``status`` is 0 or a positive errno up to 4095 (newer kernels reject more
    with EINVAL). The kernel keeps at most 5 REMOTE_AUTH serials and hands only
    the first to the consumer, so more than 5 is refused here. ``tags`` go as attribute 4
    (NUL strings, the posted session-tags series): send them only where the kernel's policy
    declares it; each is 1 to 255 bytes with no NUL, at most 64.
    """
    _check_family_id(family_id)
    if not 0 <= status <= spec.MAX_ERRNO:
        raise ValueError(f"DONE status must be 0..{spec.MAX_ERRNO}, not {status}")
    if not 0 <= sockfd <= _MAX_FD:
        raise ValueError(f"not a file descriptor: {sockfd}")
    if len(remote_auth) > spec.MAX_PEER_IDS:
        raise ValueError(f"at most {spec.MAX_PEER_IDS} REMOTE_AUTH serials, not {len(remote_auth)}")
    for serial in remote_auth:
        if not 0 <= serial <= _U32_MAX:
            raise ValueError(f"REMOTE_AUTH serial out of u32 range: {serial}")
    attrs = [_nla_u32(spec.DoneAttr.STATUS, status), _nla_u32(spec.DoneAttr.SOCKFD, sockfd)]
    attrs += [_nla_u32(spec.DoneAttr.REMOTE_AUTH, serial) for serial in remote_auth]
    if len(tags) > spec.MAX_SESSION_TAGS:
        raise ValueError(f"at most {spec.MAX_SESSION_TAGS} session tags, not {len(tags)}")
    for tag in tags:
        value = tag.encode()
        if not 0 < len(value) <= spec.SESSION_TAG_MAX_LEN or b"\0" in value:
            raise ValueError(f"a session tag of {len(value)} bytes (1 to "
                             f"{spec.SESSION_TAG_MAX_LEN}, no NUL)")
        attrs.append(_nla(spec.DONE_TAG, value + b"\0"))
    return _message(family_id, spec.NLM_F_REQUEST | spec.NLM_F_ACK, seq,
                    spec.HandshakeCmd.DONE, spec.FAMILY_VERSION, b"".join(attrs))


def encode_ksim_membership(family_id: int, seq: int, group_id: int) -> bytes:
    """kernel-sim: join multicast group ``group_id`` (setsockopt NETLINK_ADD_MEMBERSHIP)."""
    _check_family_id(family_id)
    return _encode(spec.KsimMsg, nlmsg=(family_id, spec.NLM_F_REQUEST | spec.NLM_F_ACK, seq),
                   genl=(spec.KsimCmd.ADD_MEMBERSHIP, 1),
                   attrs=[("KSIM_A_GROUP", group_id)])


def encode_ksim_setsockopt(family_id: int, seq: int, sockfd: int, level: int, optname: int,
                           value: bytes) -> bytes:
    """kernel-sim: setsockopt(``sockfd``, ``level``, ``optname``, ``value``) on the socket
    the simulator passed us (kTLS: TCP_ULP, TLS_TX, TLS_RX)."""
    _check_family_id(family_id)
    if not -2**31 <= sockfd < 2**31 or not 0 <= level <= _U32_MAX or not 0 <= optname <= _U32_MAX:
        raise ValueError(f"setsockopt arguments out of range: {sockfd}, {level}, {optname}")
    attrs = (_NLA_S32.pack(8, spec.KsimAttr.SOCKFD, sockfd)
             + _nla_u32(spec.KsimAttr.LEVEL, level) + _nla_u32(spec.KsimAttr.OPTNAME, optname)
             + _nla(spec.KsimAttr.OPTVAL, bytes(value)))
    return _message(family_id, spec.NLM_F_REQUEST | spec.NLM_F_ACK, seq,
                    spec.KsimCmd.SETSOCKOPT, 1, attrs)


# The hot messages (ACCEPT, DONE, kernel-sim's SETSOCKOPT) are packed here directly, without
# pyroute2's generic machinery; tests/unit/netlink/test_codec.py proves that both give the
# same bytes. pyroute2 (``_encode``) packs the rest: nlctrl requests, group membership.


def _message(msg_type: int, flags: int, seq: int, cmd: int, version: int, attrs: bytes) -> bytes:
    if not 0 <= seq <= _U32_MAX:
        raise ValueError(f"netlink sequence number out of u32 range: {seq}")
    length = spec.NLMSG_HDRLEN + spec.GENL_HDRLEN + len(attrs)
    # pid 0: the kernel addresses replies by socket, not by this field
    header = _NLMSGHDR.pack(length, msg_type, flags, seq, 0)
    return header + _GENLMSGHDR.pack(cmd, version, 0) + attrs


def _nla_u32(attr_type: int, value: int) -> bytes:
    return _NLA_U32.pack(spec.NLA_HDRLEN + _U32.size, attr_type, value)


def _nla(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded to NLA_ALIGNTO (the length field leaves the padding out)."""
    length = spec.NLA_HDRLEN + len(payload)
    return _NLATTR.pack(length, attr_type) + payload + bytes(_align(length) - length)


def _encode(
    cls: Any,
    *,
    nlmsg: tuple[int, int, int],
    genl: tuple[int, int],
    attrs: Sequence[tuple[str, int | str | bytes]],
) -> bytes:
    """``nlmsg`` is (type, flags, seq), ``genl`` is (cmd, version)."""
    msg_type, flags, seq = nlmsg
    if not 0 <= seq <= _U32_MAX:
        raise ValueError(f"netlink sequence number out of u32 range: {seq}")
    msg = cls()
    msg["cmd"], msg["version"] = int(genl[0]), genl[1]
    msg["attrs"] = list(attrs)
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0  # the kernel addresses replies by socket, not by this field
    msg.encode()
    return bytes(msg.data)


def _check_family_id(family_id: int) -> None:
    # Dynamic genl family IDs are allocated above nlctrl's fixed GENL_ID_CTRL.
    if not spec.GENL_ID_CTRL < family_id <= _U16_MAX:
        raise ValueError(f"not a generic netlink family ID: {family_id}")
