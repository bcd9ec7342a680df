"""tlshd.netlink.codec against hand-built bytes, real captures and fuzzing.

The builders below lay messages out field by field from the reference
(section 2.5: nlmsghdr 16 bytes, genlmsghdr 4, nlattr len/type, payloads
padded to 4). Attribute numbers are written as literals from
linux/handshake.h, not imported from tlshd.netlink.spec, so a wrong enum
value there is caught here. Golden files in tests/vectors/netlink are
compared with these independent constructions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlshd.errors import DecodeError, NetlinkError
from tlshd.netlink import codec, spec
from tlshd.netlink.codec import (
    AcceptDecodeError,
    decode,
    encode_accept,
    encode_done,
    encode_get_family,
)
from tlshd.netlink.messages import (
    AcceptReply,
    Ack,
    DumpDone,
    ErrorReply,
    FamilyInfo,
    Header,
    Ready,
    Unknown,
    X509Serials,
)
from tlshd.netlink.spec import AuthMode, HandlerClass, MsgType

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "netlink"
FAMILY = 0x1D  # stand-in for the dynamic handshake family ID used by the vectors
PORT = 0x1092
NESTED = 0x8000
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="vectors are x86 order")


# --- byte-by-byte builders ----------------------------------------------------------


def nla(attr_type: int, payload: bytes) -> bytes:
    pad = b"\0" * (-len(payload) % 4)
    return struct.pack("=HH", 4 + len(payload), attr_type) + payload + pad


def u32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("=I", value))


def u16(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("=H", value))


def strz(attr_type: int, text: str) -> bytes:
    return nla(attr_type, text.encode() + b"\0")


def nest(attr_type: int, *attrs: bytes, flag: int = NESTED) -> bytes:
    return nla(attr_type | flag, b"".join(attrs))


def nlmsg(msg_type: int, body: bytes, *, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, pid) + body


def genl(msg_type: int, cmd: int, *attrs: bytes, version: int = 1, **hdr: int) -> bytes:
    return nlmsg(msg_type, struct.pack("=BBH", cmd, version, 0) + b"".join(attrs), **hdr)


def nlerr(error: int, request: bytes, *, flags: int = 0, seq: int = 0, tlvs: bytes = b"") -> bytes:
    return nlmsg(2, struct.pack("=i", error) + request + tlvs, flags=flags, seq=seq, pid=PORT)


def accept_reply(*attrs: bytes, seq: int = 2) -> bytes:
    return genl(FAMILY, 2, *attrs, seq=seq, pid=PORT)


def ready(handler_class: int = 1) -> bytes:
    return genl(FAMILY, 1, u32(2, handler_class))


MINIMAL = (u32(1, 7), u32(3, 1), u32(5, 1))  # SOCKFD 7, CLIENTHELLO, UNAUTH


def load(name: str) -> bytes:
    text = (VECTORS / f"{name}.hex").read_text()
    return bytes.fromhex("".join(re.sub(r"#.*", "", line) for line in text.splitlines()))


def hdr(msg_type: int, *, flags: int = 0, seq: int = 0, pid: int = 0) -> Header:
    return Header(type=msg_type, flags=flags, seq=seq, pid=pid)


def parse_genl(data: bytes) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, bytes]]]:
    """An independent reader for the requests we encode."""
    header = struct.unpack_from("=IHHII", data)
    assert header[0] == len(data)
    genlhdr = struct.unpack_from("=BBH", data, 16)
    attrs, offset = [], 20
    while offset < len(data):
        length, attr_type = struct.unpack_from("=HH", data, offset)
        attrs.append((attr_type, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    assert offset == len(data)
    return header, genlhdr, attrs


# --- golden vectors: what the kernel sends -------------------------------------------

NFS_X509 = accept_reply(
    u32(1, 7),  # SOCKFD
    u32(3, 1),  # MESSAGE_TYPE CLIENTHELLO
    strz(8, "server.example.com"),  # PEERNAME, NUL included
    u32(5, 3),  # AUTH_MODE X509
    nest(7, u32(1, 0x2C6B2AD1), u32(2, 0x0E1F5A33)),  # CERTIFICATE{CERT, PRIVKEY}
)
PSK_CLIENT = accept_reply(
    u32(1, 9),
    u32(3, 1),
    u32(4, 10000),  # TIMEOUT
    u32(9, 0x3B9ACA07),  # KEYRING
    u32(5, 2),  # AUTH_MODE PSK
    *(u32(6, serial) for serial in (0x1D0E2F01, 0x1D0E2F02, 0x1D0E2F03)),
    seq=3,
)
ACCEPT_REQUEST = genl(FAMILY, 2, u32(2, 1), flags=1, seq=2)
DONE_REQUEST = genl(FAMILY, 3, u32(1, 0), u32(2, 7), u32(3, 0x2C6B2AD2), flags=5, seq=4)
# fmt: off
FAMILY_REPLY = genl(
    0x10, 1,  # CTRL_CMD_NEWFAMILY
    strz(2, "handshake"), u16(1, FAMILY), u32(3, 1), u32(4, 0), u32(5, 0),  # NAME ID VERSION ...
    nest(6, nest(1, u32(1, 2), u32(2, 0x0B), flag=0),  # OPS: ACCEPT, ADMIN_PERM|DO|HASPOL
         nest(2, u32(1, 3), u32(2, 0x0A), flag=0), flag=0),  # DONE, DO|HASPOL
    nest(7, nest(1, u32(2, 0x12), strz(1, "none"), flag=0),  # MCAST_GROUPS: ID before NAME
         nest(2, u32(2, 0x13), strz(1, "tlshd"), flag=0), flag=0),
    version=2, seq=1, pid=PORT,
)
# fmt: on

BUILT = {
    "handshake-ready": ready(),
    "handshake-accept-request": ACCEPT_REQUEST,
    "handshake-accept-reply-nfs-x509-client": NFS_X509,
    "handshake-accept-reply-psk-client": PSK_CLIENT,
    "handshake-accept-error-eagain": nlerr(-11, ACCEPT_REQUEST, seq=2),
    "handshake-done-request": DONE_REQUEST,
    "handshake-done-ack": nlerr(0, DONE_REQUEST[:16], flags=0x100, seq=4),
    "handshake-getfamily-reply": FAMILY_REPLY,
    "nlctrl-getfamily-request-handshake": genl(0x10, 3, strz(2, "handshake"), flags=1, seq=8),
}
CAPTURED = sorted(path.stem for path in VECTORS.glob("*-linux-6.18.hex"))  # real kernel bytes
ALL_VECTORS = sorted(BUILT) + CAPTURED


def test_every_vector_file_is_used() -> None:
    assert sorted(path.stem for path in VECTORS.glob("*.hex")) == sorted(ALL_VECTORS)
    assert len(CAPTURED) == 5


@little_endian_only
@pytest.mark.parametrize("name", sorted(BUILT))
def test_vector_file_equals_its_byte_by_byte_construction(name: str) -> None:
    assert load(name) == BUILT[name]


@little_endian_only
def test_accept_reply_for_nfs_x509_client_in_mainline_order() -> None:
    assert decode(load("handshake-accept-reply-nfs-x509-client"), FAMILY) == [
        AcceptReply(
            header=hdr(FAMILY, seq=2, pid=PORT),
            sockfd=7,
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.X509,
            peername="server.example.com",
            timeout_ms=None,
            keyring=None,
            peer_identities=(),
            certificate=X509Serials(cert=0x2C6B2AD1, privkey=0x0E1F5A33),
            unknown_attrs=(),
        )
    ]


@little_endian_only
def test_accept_reply_for_psk_client_keeps_identities_in_order() -> None:
    [reply] = decode(load("handshake-accept-reply-psk-client"), FAMILY)
    assert isinstance(reply, AcceptReply)
    assert (reply.sockfd, reply.message_type, reply.auth_mode) == (9, 1, AuthMode.PSK)
    assert (reply.timeout_ms, reply.keyring, reply.peername) == (10000, 0x3B9ACA07, None)
    assert reply.peer_identities == (0x1D0E2F01, 0x1D0E2F02, 0x1D0E2F03)
    assert reply.certificate is None
    assert reply.header.seq == 3


@little_endian_only
def test_ready_multicast() -> None:
    assert decode(load("handshake-ready"), FAMILY) == [Ready(hdr(FAMILY), HandlerClass.TLSHD)]


@little_endian_only
def test_handshake_family_reply_lists_both_groups() -> None:
    [info] = decode(load("handshake-getfamily-reply"), None)
    assert info == FamilyInfo(
        header=hdr(0x10, seq=1, pid=PORT),
        name="handshake",
        family_id=FAMILY,
        version=1,
        mcast_groups={"none": 0x12, "tlshd": 0x13},
    )
    with pytest.raises(TypeError):  # read-only
        info.mcast_groups["tlshd"] = 1  # type: ignore[union-attr, index]


@little_endian_only
def test_nlctrl_reply_captured_from_linux() -> None:
    [info] = decode(load("nlctrl-getfamily-reply-nlctrl-linux-6.18"), None)
    assert isinstance(info, FamilyInfo)
    assert (info.name, info.family_id, info.version) == ("nlctrl", 0x10, 2)
    assert info.mcast_groups == {"notify": 0x10}
    assert info.header == hdr(0x10, seq=7, pid=0x11FC)


@little_endian_only
def test_eagain_answer_to_accept() -> None:
    [reply] = decode(load("handshake-accept-error-eagain"), FAMILY)
    assert reply == ErrorReply(hdr(2, seq=2, pid=PORT), errno=errno.EAGAIN, offending_type=FAMILY)
    assert reply.seq == 2


@little_endian_only
def test_ack_for_done() -> None:
    [ack] = decode(load("handshake-done-ack"), FAMILY)
    assert ack == Ack(hdr(2, flags=0x100, seq=4, pid=PORT))
    assert (ack.seq, ack.pid) == (4, PORT)


POLICY_MSG = "Attribute failed policy validation"


@little_endian_only
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nlctrl-error-enoent-linux-6.18", (ErrorReply, errno.ENOENT, 8, None)),
        ("nlctrl-error-extack-linux-6.18", (ErrorReply, errno.EINVAL, 11, POLICY_MSG)),
        ("nlctrl-error-extack-capped-linux-6.18", (ErrorReply, errno.EINVAL, 12, POLICY_MSG)),
        ("nlctrl-ack-linux-6.18", (Ack, 0, 9, None)),
    ],
)
def test_captured_errors_and_ack(name: str, expected: tuple[type, int, int, str | None]) -> None:
    [reply] = decode(load(name), None)
    errno_, message = getattr(reply, "errno", 0), getattr(reply, "message", None)
    assert (type(reply), errno_, reply.seq, message) == expected  # type: ignore[union-attr]
    assert reply.header.pid in (0x1373, 0x13D5)


def test_error_reply_becomes_netlink_error() -> None:
    [reply] = decode(nlerr(-11, ACCEPT_REQUEST, seq=2), FAMILY)
    assert isinstance(reply, ErrorReply)
    exc = reply.to_exception("ACCEPT")
    assert isinstance(exc, NetlinkError)
    assert exc.errno == errno.EAGAIN
    assert reply.errno_name == "EAGAIN"


# --- golden vectors: what we send --------------------------------------------------------


@little_endian_only
@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("nlctrl-getfamily-request-handshake", lambda: encode_get_family("handshake", 8)),
        ("handshake-accept-request", lambda: encode_accept(FAMILY, 2)),
        ("handshake-done-request", lambda: encode_done(FAMILY, 4, 0, 7, [0x2C6B2AD2])),
    ],
)
def test_encoders_match_vectors(name: str, request_bytes: Callable[[], bytes]) -> None:
    assert request_bytes() == load(name)


@little_endian_only
def test_encode_get_family_is_what_the_kernel_echoed() -> None:
    assert load("nlctrl-error-enoent-linux-6.18").endswith(encode_get_family("handshake", 8))


@given(
    seq=st.integers(0, 2**32 - 1),
    status=st.integers(0, 4095),
    sockfd=st.integers(0, 2**31 - 1),
    remote_auth=st.lists(st.integers(0, 2**32 - 1), max_size=5),
)
def test_encode_done_round_trips(
    seq: int, status: int, sockfd: int, remote_auth: list[int]
) -> None:
    header, genlhdr, attrs = parse_genl(encode_done(FAMILY, seq, status, sockfd, remote_auth))
    assert header[1:] == (FAMILY, 1 | 4, seq, 0)
    assert genlhdr == (3, 1, 0)
    values = [(t, struct.unpack("=I", p)[0]) for t, p in attrs]
    assert values == [(1, status), (2, sockfd)] + [(3, serial) for serial in remote_auth]


@given(seq=st.integers(0, 2**32 - 1), family_id=st.integers(0x11, 0xFFFF))
def test_encode_accept_round_trips(seq: int, family_id: int) -> None:
    header, genlhdr, attrs = parse_genl(encode_accept(family_id, seq))
    assert header[1:] == (family_id, 1, seq, 0)  # NLM_F_REQUEST only: no ACK on success
    assert genlhdr == (2, 1, 0)
    assert attrs == [(2, struct.pack("=I", 1))]


@pytest.mark.parametrize("status", [-1, 4096, 2**32])
def test_encode_done_refuses_status_outside_0_to_4095(status: int) -> None:
    with pytest.raises(ValueError, match="status"):
        encode_done(FAMILY, 1, status, 7)


def test_encode_done_refuses_more_than_five_remote_auth() -> None:
    encode_done(FAMILY, 1, 0, 7, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="at most 5"):
        encode_done(FAMILY, 1, 0, 7, [1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_done(FAMILY, 1, 0, -1),
        lambda: encode_done(FAMILY, 1, 0, 7, [2**32]),
        lambda: encode_done(0x10, 1, 0, 7),
        lambda: encode_accept(0x10000, 1),
        lambda: encode_accept(FAMILY, -1),
        lambda: encode_accept(FAMILY, 1, 2),  # type: ignore[arg-type]
        lambda: encode_get_family("", 1),
        lambda: encode_get_family("a" * 16, 1),
        lambda: encode_get_family("hand\0shake", 1),
        lambda: decode(b"", 0x10),
    ],
)
def test_out_of_range_arguments_raise_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# --- decoding behaviour ---------------------------------------------------------------------


def test_one_buffer_holds_several_messages() -> None:
    done = nlmsg(3, b"\0" * 4, flags=2)
    messages = decode(ready() + nlerr(0, DONE_REQUEST[:16], flags=0x100, seq=4) + done, FAMILY)
    assert [type(m) for m in messages] == [Ready, Ack, DumpDone]  # the end of a dump
    assert messages[2] == DumpDone(hdr(3, flags=2))


def test_unaligned_message_is_followed_at_the_aligned_offset() -> None:
    padded = accept_reply(*MINIMAL, strz(8, "ab"))  # PEERNAME len 7 + 1 pad byte
    unpadded = struct.pack("=I", len(padded) - 1) + padded[4:-1]  # nlmsg_len 47
    assert [type(m) for m in decode(unpadded + b"\0" + ready(), FAMILY)] == [AcceptReply, Ready]
    [reply] = decode(unpadded, FAMILY)
    assert isinstance(reply, AcceptReply)
    assert reply.peername == "ab"


@pytest.mark.parametrize(
    ("data", "family_id"),
    [
        (nlmsg(1, b""), FAMILY),  # NLMSG_NOOP
        (genl(0x30, 1, b"\xff\xff"), FAMILY),  # another family, not even checked
        (genl(FAMILY, 3, u32(1, 0)), FAMILY),  # a DONE command the kernel never sends
        (ready(), None),  # family not resolved yet
        (genl(0x10, 2, b"junk"), None),  # CTRL_CMD_DELFAMILY
    ],
)
def test_messages_of_other_types_are_unknown_not_errors(data: bytes, family_id: int | None) -> None:
    [message] = decode(data, family_id)
    assert isinstance(message, Unknown)


def test_unknown_attributes_are_tolerated_and_listed() -> None:
    data = accept_reply(u32(10, 1), *MINIMAL, u32(11, 5), nest(10, u32(1, 2)), nla(0x3FFF, b""))
    [reply] = decode(data, FAMILY)
    assert isinstance(reply, AcceptReply)
    assert reply.unknown_attrs == (10, 11, 0x3FFF)
    assert reply.sockfd == 7


def test_type_flags_are_masked_and_certificate_nest_flag_is_optional() -> None:
    fd_with_byteorder_flag = nla(0x4001, struct.pack("=I", 7))
    cert_without_nested_flag = nest(7, u32(1, 1), u32(2, 2), flag=0)
    data = accept_reply(fd_with_byteorder_flag, u32(3, 2), u32(5, 3), cert_without_nested_flag)
    [reply] = decode(data, FAMILY)
    assert isinstance(reply, AcceptReply)
    assert (reply.sockfd, reply.message_type) == (7, MsgType.SERVERHELLO)
    assert reply.certificate == X509Serials(1, 2)


def test_ready_for_an_unknown_handler_class_is_kept_as_int() -> None:
    [message] = decode(ready(2), FAMILY)
    assert message == Ready(hdr(FAMILY), 2)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert decode(bytearray(ready()), FAMILY) == decode(memoryview(ready()), FAMILY)  # type: ignore[arg-type]


# --- malformed input -------------------------------------------------------------------------


def extra(*attrs: bytes) -> bytes:
    """A valid ACCEPT reply with ``attrs`` appended."""
    return accept_reply(*MINIMAL, *attrs)


def ctrl(*attrs: bytes) -> bytes:
    """An nlctrl NEWFAMILY message with name, ID and version, then ``attrs``."""
    return genl(0x10, 1, strz(2, "h"), u16(1, 30), u32(3, 1), *attrs)


CERT = nest(7, u32(1, 5), u32(2, 6))
SOCKFD, CLIENTHELLO, UNAUTH = MINIMAL
ECHO = DONE_REQUEST[:16]
LONG_ECHO = b"\x63" + ECHO[1:]  # claims 99 bytes
GROUPS = tuple(nest(i, u32(2, i), strz(1, "x")) for i in (1, 2))
# fmt: off
MALFORMED = {
    "nlmsg_len below 16": (struct.pack("=IHHII", 15, FAMILY, 0, 0, 0), "nlmsg_len 15 < 16 at"),
    "nlmsg_len past the end": (ready()[:-4], "exceeds the 24 bytes left"),
    "stray bytes after a message": (ready() + b"\0" * 8, "8 stray bytes at offset 28"),
    "no genlmsghdr": (nlmsg(FAMILY, b"\x01\x01"), "no genlmsghdr"),
    "attribute length below 4": (extra(b"\x03\x00\x0a\x00"), "length 3 < 4"),
    "attribute past the end": (extra(struct.pack("=HHI", 12, 10, 0)), "past the end"),
    "stray bytes after attributes": (extra(b"\0\0"), "2 stray bytes"),
    "u32 of 3 bytes": (accept_reply(nla(1, b"\7\0\0"), CLIENTHELLO, UNAUTH), "3-byte payload"),
    "u32 of 8 bytes": (extra(nla(4, b"\0" * 8)), "8-byte payload, expected 4"),
    "PEERNAME without NUL": (extra(nla(8, b"host")), "not NUL-terminated"),
    "PEERNAME empty": (extra(nla(8, b"")), "not NUL-terminated"),
    "PEERNAME with inner NUL": (extra(nla(8, b"a\0b\0")), "NUL before its end"),
    "PEERNAME not UTF-8": (extra(nla(8, b"\xff\xfe\0")), "not UTF-8"),
    "CERT of 2 bytes": (extra(nest(7, u32(1, 5), nla(2, b"\1\2"))), "2-byte payload"),
    "CERTIFICATE without PRIVKEY": (extra(nest(7, u32(1, 5))), "PRIVKEY missing"),
    "CERTIFICATE inner overrun": (extra(nla(7 | NESTED, struct.pack("=HHI", 16, 1, 5))), "past"),
    "CERT nested in CERTIFICATE": (extra(nest(7, nest(1, u32(1, 5)), u32(2, 6))), "deeper"),
    "scalar flagged nested": (extra(nla(4 | NESTED, struct.pack("=I", 1))), "deeper than the spec"),
    "two CERTIFICATEs": (extra(CERT, CERT), "CERTIFICATE repeated"),
    "two SOCKFDs": (extra(u32(1, 8)), "SOCKFD repeated"),
    "SOCKFD missing": (accept_reply(CLIENTHELLO, UNAUTH), "SOCKFD missing"),
    "MESSAGE_TYPE missing": (accept_reply(SOCKFD, UNAUTH), "MESSAGE_TYPE missing"),
    "AUTH_MODE missing": (accept_reply(SOCKFD, CLIENTHELLO), "AUTH_MODE missing"),
    "SOCKFD above 2**31-1": (accept_reply(u32(1, 2**31), CLIENTHELLO, UNAUTH), "not a file desc"),
    "unknown MESSAGE_TYPE": (accept_reply(SOCKFD, u32(3, 3), UNAUTH), "MESSAGE_TYPE 3"),
    "unknown AUTH_MODE": (accept_reply(SOCKFD, CLIENTHELLO, u32(5, 4)), "AUTH_MODE 4"),
    "READY without HANDLER_CLASS": (genl(FAMILY, 1), "HANDLER_CLASS missing"),
    "NLMSG_ERROR too short": (nlmsg(2, b"\0" * 8), "too short"),
    "NLMSG_ERROR positive error": (nlerr(5, ECHO), "carries error 5"),
    "NLMSG_ERROR beyond MAX_ERRNO": (nlerr(-4096, ECHO), "carries error -4096"),
    "ext-ack echo overruns": (nlerr(-22, LONG_ECHO, flags=0x200), "bad nlmsg_len 99"),
    "ext-ack MSG without NUL": (nlerr(-22, ECHO, flags=0x300, tlvs=nla(1, b"!")), "not NUL"),
    "family reply without FAMILY_ID": (genl(0x10, 1, strz(2, "h"), u32(3, 1)), "FAMILY_ID missing"),
    "FAMILY_ID as u32": (genl(0x10, 1, strz(2, "h"), u32(1, 30), u32(3, 1)), "4-byte payload"),
    "group without ID": (ctrl(nest(7, nest(1, strz(1, "tlshd")))), "GRP_ID missing"),
    "group listed twice": (ctrl(nest(7, *GROUPS)), "listed twice"),
    "group entry garbage": (ctrl(nest(7, nla(1, b"\1\2\3"))), "3 stray bytes"),
    "second message malformed": (ready() + genl(FAMILY, 1, nla(2, b"\1")), "at offset 48"),
}
# fmt: on


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_decode_error_naming_the_offset(case: str) -> None:
    data, expected = MALFORMED[case]
    with pytest.raises(DecodeError, match=re.escape(expected)) as info:
        decode(data, FAMILY)
    assert "offset" in str(info.value)


@pytest.mark.parametrize(
    ("data", "sockfd"),
    [
        (accept_reply(SOCKFD, u32(3, 3), UNAUTH), 7),  # from a newer kernel
        (accept_reply(SOCKFD, CLIENTHELLO), 7),
        (extra(b"\x03\x00\x0a\x00"), 7),  # framing breaks after SOCKFD
        (accept_reply(CLIENTHELLO, UNAUTH), None),
        (accept_reply(u32(1, 2**31), CLIENTHELLO, UNAUTH), None),
    ],
)
def test_broken_accept_reply_still_names_the_installed_fd(data: bytes, sockfd: int | None) -> None:
    with pytest.raises(AcceptDecodeError) as info:
        decode(data, FAMILY)
    assert info.value.sockfd == sockfd
    assert info.value.status == errno.EINVAL


# --- properties ---------------------------------------------------------------------------------

u32s = st.integers(0, 2**32 - 1)


peernames = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=40)
OPTIONAL = {4: u32s, 9: u32s, 7: st.tuples(u32s, u32s), 8: peernames}  # TIMEOUT KEYRING CERT NAME


def encode_part(attr_type: int, value: object) -> bytes:
    if attr_type == 7:
        cert, privkey = value  # type: ignore[misc]
        return nest(7, u32(1, cert), u32(2, privkey))
    if attr_type == 8:
        return strz(8, str(value))
    return nla(attr_type, b"?") if attr_type >= 10 else u32(attr_type, int(value))  # type: ignore[call-overload]


@st.composite
def accept_replies(draw: st.DrawFn) -> tuple[bytes, AcceptReply]:
    """An ACCEPT reply in any attribute order, with the value decode must return."""
    parts: list[tuple[int, object]] = [(1, draw(st.integers(0, 2**31 - 1)))]
    parts += [(3, draw(st.sampled_from(MsgType))), (5, draw(st.sampled_from(AuthMode)))]
    parts += [
        (t, v) for t, values in OPTIONAL.items() if (v := draw(st.none() | values)) is not None
    ]
    parts += [(6, v) for v in draw(st.lists(u32s, max_size=5))]
    parts += [(t, None) for t in draw(st.lists(st.integers(10, 0x3FFF), max_size=3, unique=True))]
    parts = draw(st.permutations(parts))
    first: dict[int, Any] = {t: v for t, v in reversed(parts)}
    expected = AcceptReply(
        header=hdr(FAMILY, seq=2, pid=PORT),
        sockfd=first[1],
        message_type=first[3],
        auth_mode=first[5],
        peername=first.get(8),
        timeout_ms=first.get(4),
        keyring=first.get(9),
        peer_identities=tuple(v for t, v in parts if t == 6),  # type: ignore[misc]
        certificate=X509Serials(*first[7]) if 7 in first else None,
        unknown_attrs=tuple(t for t, _ in parts if t >= 10),
    )
    return accept_reply(*(encode_part(t, v) for t, v in parts)), expected


@given(accept_replies())
def test_any_attribute_order_decodes_to_the_same_reply(case: tuple[bytes, AcceptReply]) -> None:
    data, expected = case
    assert decode(data, FAMILY) == [expected]


def _decodes_or_raises_decode_error(data: bytes, family_id: int | None) -> None:
    with contextlib.suppress(DecodeError):
        decode(data, family_id)


@given(st.binary(max_size=256), st.sampled_from([None, FAMILY]))
def test_arbitrary_bytes_raise_nothing_but_decode_error(data: bytes, family_id: int | None) -> None:
    _decodes_or_raises_decode_error(data, family_id)


@given(st.lists(st.sampled_from(ALL_VECTORS), min_size=1, max_size=3), st.data())
def test_random_byte_mutations_raise_nothing_but_decode_error(
    names: list[str], data: st.DataObject
) -> None:
    buf = bytearray(b"".join(load(name) for name in names))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    _decodes_or_raises_decode_error(bytes(buf), FAMILY)


@little_endian_only
@pytest.mark.parametrize("name", ALL_VECTORS)
def test_every_truncation_raises_nothing_but_decode_error(name: str) -> None:
    data = load(name)
    for length in range(len(data)):
        if length:
            with pytest.raises(DecodeError):
                decode(data[:length], FAMILY)
    assert decode(data[:0], FAMILY) == []


@little_endian_only
@pytest.mark.parametrize("name", ALL_VECTORS)
def test_every_single_byte_mutation_raises_nothing_but_decode_error(name: str) -> None:
    data = load(name)
    for offset, byte in enumerate(data):
        for value in {0, 0xFF, (byte + 4) & 0xFF} | {byte ^ bit for bit in (1, 4, 0x40, 0x80)}:
            mutated = data[:offset] + bytes([value]) + data[offset + 1 :]
            _decodes_or_raises_decode_error(mutated, FAMILY)


def _nla(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def _genl(family_id: int, cmd: int, seq: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), family_id, 0x1 | 0x4, seq, 0) + body


def test_kernel_sim_requests_are_the_bytes_its_family_expects() -> None:
    """Written out by hand from docs/kernel-sim.md (the layout SimUpcall used to build
    itself): the codec is now the one encoder."""
    assert codec.encode_ksim_membership(0x20, 7, 3) == _genl(
        0x20, 1, 7, _nla(1, struct.pack("=I", 3)))
    value = b"\x04\x03\x34\x00" + b"k" * 37  # an odd length: padded
    assert codec.encode_ksim_setsockopt(0x20, 8, 12, 282, 1, value) == _genl(
        0x20, 3, 8, _nla(2, struct.pack("=i", 12)) + _nla(3, struct.pack("=I", 282))
        + _nla(4, struct.pack("=I", 1)) + _nla(5, value))


# --- the direct hot-path codec against pyroute2 (issue 16) ------------------------
# pyroute2's classes in tlshd.netlink.spec declare the attribute sets; the hot messages are
# packed and read without it. These prove both give the same bytes and the same values.


@given(seq=st.integers(0, 2**32 - 1), status=st.integers(0, 4095),
       sockfd=st.integers(0, 2**31 - 1),
       remote_auth=st.lists(st.integers(0, 2**32 - 1), max_size=5),
       family_id=st.integers(0x11, 0xFFFF))
def test_done_is_the_bytes_pyroute2_packs(seq: int, status: int, sockfd: int,
                                          remote_auth: list[int], family_id: int) -> None:
    attrs: list[tuple[str, int | str | bytes]] = [
        ("HANDSHAKE_A_DONE_STATUS", status), ("HANDSHAKE_A_DONE_SOCKFD", sockfd)]
    attrs += [("HANDSHAKE_A_DONE_REMOTE_AUTH", serial) for serial in remote_auth]
    assert encode_done(family_id, seq, status, sockfd, remote_auth) == codec._encode(
        spec.DoneMsg, nlmsg=(family_id, 0x1 | 0x4, seq), genl=(3, 1), attrs=attrs)


@given(seq=st.integers(0, 2**32 - 1), family_id=st.integers(0x11, 0xFFFF))
def test_accept_request_is_the_bytes_pyroute2_packs(seq: int, family_id: int) -> None:
    assert encode_accept(family_id, seq) == codec._encode(
        spec.AcceptMsg, nlmsg=(family_id, 0x1, seq), genl=(2, 1),
        attrs=[("HANDSHAKE_A_ACCEPT_HANDLER_CLASS", 1)])


@given(seq=st.integers(0, 2**32 - 1), sockfd=st.integers(-2**31, 2**31 - 1),
       level=st.integers(0, 2**32 - 1), optname=st.integers(0, 2**32 - 1),
       value=st.binary(max_size=80))
def test_kernel_sim_setsockopt_is_the_bytes_pyroute2_packs(
        seq: int, sockfd: int, level: int, optname: int, value: bytes) -> None:
    assert codec.encode_ksim_setsockopt(0x20, seq, sockfd, level, optname, value) == \
        codec._encode(spec.KsimMsg, nlmsg=(0x20, 0x1 | 0x4, seq), genl=(3, 1),
                      attrs=[("KSIM_A_SOCKFD", sockfd), ("KSIM_A_LEVEL", level),
                             ("KSIM_A_OPTNAME", optname), ("KSIM_A_OPTVAL", value)])


def _through_pyroute2(data: bytes) -> AcceptReply:
    """What the codec returned when pyroute2 read the values (before issue 16)."""
    msg = spec.AcceptMsg(data)
    msg.decode()
    cert = msg.get_attr("HANDSHAKE_A_ACCEPT_CERTIFICATE")
    peername = msg.get_attr("HANDSHAKE_A_ACCEPT_PEERNAME")
    return AcceptReply(
        header=hdr(msg["header"]["type"], flags=msg["header"]["flags"],
                   seq=msg["header"]["sequence_number"], pid=msg["header"]["pid"]),
        sockfd=msg.get_attr("HANDSHAKE_A_ACCEPT_SOCKFD"),
        message_type=MsgType(msg.get_attr("HANDSHAKE_A_ACCEPT_MESSAGE_TYPE")),
        auth_mode=AuthMode(msg.get_attr("HANDSHAKE_A_ACCEPT_AUTH_MODE")),
        peername=None if peername is None else str(peername),
        timeout_ms=msg.get_attr("HANDSHAKE_A_ACCEPT_TIMEOUT"),
        keyring=msg.get_attr("HANDSHAKE_A_ACCEPT_KEYRING"),
        peer_identities=tuple(msg.get_attrs("HANDSHAKE_A_ACCEPT_PEER_IDENTITY")),
        certificate=None if cert is None else X509Serials(
            cert.get_attr("HANDSHAKE_A_X509_CERT"), cert.get_attr("HANDSHAKE_A_X509_PRIVKEY")),
        unknown_attrs=(),
    )


@given(accept_replies())
def test_accept_reply_reads_the_values_pyroute2_reads(case: tuple[bytes, AcceptReply]) -> None:
    data, _expected = case
    (ours,) = decode(data, FAMILY)
    assert isinstance(ours, AcceptReply)
    assert dataclasses.replace(ours, unknown_attrs=()) == _through_pyroute2(data)


@pytest.mark.parametrize("name", sorted(n for n in ALL_VECTORS if "accept-reply" in n))
def test_captured_accept_replies_read_as_pyroute2_reads_them(name: str) -> None:
    data = load(name)
    (ours,) = decode(data, FAMILY)
    assert isinstance(ours, AcceptReply)
    assert dataclasses.replace(ours, unknown_attrs=()) == _through_pyroute2(data)


def test_encode_done_puts_session_tags_after_remote_auth_as_nul_strings() -> None:
    _, _, attrs = parse_genl(encode_done(FAMILY, 9, 0, 7, [5], ["staff", "a-b_1"]))
    assert [t for t, _ in attrs] == [1, 2, 3, 4, 4]
    assert [p for t, p in attrs if t == 4] == [b"staff\0", b"a-b_1\0"]


@pytest.mark.parametrize("tags", [[""], ["x" * 256], ["a\0b"], [f"t{i}" for i in range(65)]])
def test_encode_done_refuses_tags_the_kernel_series_would_refuse(tags: list[str]) -> None:
    with pytest.raises(ValueError, match="tag"):
        encode_done(FAMILY, 1, 0, 7, (), tags)
