"""Wire format of kernel-sim's netlink layer, checked against hand-built bytes."""

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_sim import genl
from kernel_sim.handshake import netlink as hsnl
from kernel_sim.profile import LINUX_6_12, MAINLINE


def test_u32_attribute_is_length_8_type_then_little_endian_value():
    assert genl.nla_u32(2, 1) == bytes.fromhex("0800 0200 01000000".replace(" ", ""))


def test_string_attribute_counts_the_nul_and_pads_to_four():
    attr = genl.nla_string(8, "srv")
    assert attr == struct.pack("=HH", 8, 8) + b"srv\0"
    attr = genl.nla_string(8, "server")
    assert attr[:4] == struct.pack("=HH", 11, 8) and len(attr) == 12 and attr[-1:] == b"\0"


def test_nested_attribute_sets_nla_f_nested_unless_noflag():
    assert struct.unpack_from("=HH", genl.nla_nest(7, [genl.nla_u32(1, 5)]))[1] == 7 | 0x8000
    assert struct.unpack_from("=HH", genl.nla_nest(7, [], flag=False))[1] == 7


def test_ready_message_is_byte_exact():
    # nlmsghdr: len 28, type family, flags 0, seq 0, pid 0; genl: cmd 1 version 1; HANDLER_CLASS=1
    expected = struct.pack("=IHHII", 28, 0x22, 0, 0, 0) + bytes([1, 1, 0, 0]) + \
        struct.pack("=HHI", 8, 2, 1)
    assert hsnl.ready_message(0x22, 1) == expected


def test_error_reply_echoes_whole_request_and_ack_only_its_header():
    request = genl.genlmsg(0x22, 2, 0, genl.nla_u32(2, 1), seq=7, pid=0, flags=1)
    err = genl.nlmsg_error(-errno.EAGAIN, request, portid=99)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", err)
    assert (mtype, flags, seq, pid) == (2, 0, 7, 99)
    assert struct.unpack_from("=i", err, 16)[0] == -errno.EAGAIN
    assert err[20:] == request and length == len(err)
    ack = genl.nlmsg_error(0, request, portid=99)
    assert struct.unpack_from("=IHHII", ack)[2] == genl.NLM_F_CAPPED and ack[20:] == request[:16]


def _accept_request(attrs: bytes) -> genl.GenlMessage:
    return genl.parse_genl(genl.genlmsg(0x22, hsnl.CMD_ACCEPT, 0, attrs, seq=1, flags=1))


@pytest.mark.parametrize("attrs, why", [
    (genl.nla_u32(1, 5) + genl.nla_u32(2, 1), "SOCKFD has no policy in ACCEPT: NLA_UNSPEC"),
    (genl.nla_u32(3, 1), "above maxattr 2"),
    (genl.nla_u32(2, 3), "NLA_POLICY_MAX(2)"),
    (genl.nla(2, b"\x01\x00"), "u32 of length 2"),
    (genl.nla_u32(2, 1) + b"\x01\x02", "trailing bytes"),
])
def test_accept_policy_rejects_with_einval(attrs, why):
    with pytest.raises(genl.NetlinkError) as info:
        genl.validate_attrs(_accept_request(attrs).attr_data, hsnl.accept_policy(MAINLINE))
    assert info.value.errno == -errno.EINVAL, why


def test_done_status_cap_depends_on_kernel_profile():
    attrs = genl.nla_u32(1, 4096) + genl.nla_s32(2, 3)
    with pytest.raises(genl.NetlinkError):
        genl.validate_attrs(attrs, hsnl.done_policy(MAINLINE))
    assert genl.validate_attrs(attrs, hsnl.done_policy(LINUX_6_12))[1] == [struct.pack("=I", 4096)]


def test_getfamily_reply_resolves_family_and_tlshd_group():
    desc = hsnl.family_desc(MAINLINE, 0x22, (11, 12))
    request = genl.parse_genl(genl.genlmsg(genl.GENL_ID_CTRL, genl.CTRL_CMD_GETFAMILY, 1,
                                           genl.nla_string(genl.CTRL_ATTR_FAMILY_NAME, "handshake"),
                                           seq=3, flags=1))
    assert genl.ctrl_lookup(request, [desc]) is desc
    reply = genl.parse_genl(genl.ctrl_family_reply(desc, seq=3, portid=5))
    attrs = {t: p for t, _raw, p in genl.iter_attrs(reply.attr_data)}
    assert struct.unpack("=H", attrs[genl.CTRL_ATTR_FAMILY_ID])[0] == 0x22
    groups = {}
    for _i, _raw, nest in genl.iter_attrs(attrs[genl.CTRL_ATTR_MCAST_GROUPS]):
        inner = {t: p for t, _r, p in genl.iter_attrs(nest)}
        groups[genl.get_string(inner[genl.CTRL_ATTR_MCAST_GRP_NAME])] = \
            genl.get_u32(inner[genl.CTRL_ATTR_MCAST_GRP_ID])
    assert groups == {"none": 11, "tlshd": 12}


def test_getfamily_for_unknown_name_is_enoent():
    request = genl.parse_genl(genl.genlmsg(genl.GENL_ID_CTRL, 3, 1,
                                           genl.nla_string(2, "nope"), flags=1))
    with pytest.raises(genl.NetlinkError) as info:
        genl.ctrl_lookup(request, [hsnl.family_desc(MAINLINE, 0x22, (11, 12))])
    assert info.value.errno == -errno.ENOENT


@given(st.binary(max_size=200))
def test_attribute_validation_only_ever_raises_netlink_errors(data):
    try:
        genl.validate_attrs(data, hsnl.done_policy(MAINLINE))
    except genl.NetlinkError as exc:
        assert exc.errno == -errno.EINVAL


@given(st.binary(max_size=300))
def test_message_splitting_never_runs_past_the_buffer(data):
    for msg in genl.split_messages(data):
        assert 16 <= len(msg) <= len(data)
