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


def _policy_request(flags: int = 0x301, **attrs: int) -> genl.GenlMessage:
    body = genl.nla_string(genl.CTRL_ATTR_FAMILY_NAME, "handshake")
    if "op" in attrs:
        body += genl.nla_u32(genl.CTRL_ATTR_OP, attrs["op"])
    return genl.parse_genl(genl.genlmsg(genl.GENL_ID_CTRL, genl.CTRL_CMD_GETPOLICY, 1, body,
                                        seq=9, flags=flags))


def _dump(profile) -> tuple[dict[int, int], dict[int, dict[int, int]], list[int]]:
    """(op -> policy index, index -> {attribute: NL type}, message types) of a dump."""
    desc = hsnl.family_desc(profile, 0x22, (11, 12))
    data = genl.ctrl_policy_dump(_policy_request(), [desc], portid=5)
    ops, policies, types = {}, {}, []
    for msg in genl.split_messages(data):
        header = genl.parse_header(msg)
        types.append(header.type)
        assert header.flags & genl.NLM_F_MULTI and header.seq == 9
        if header.type == genl.NLMSG_DONE:
            continue
        for kind, _raw, payload in genl.iter_attrs(genl.parse_genl(msg).attr_data):
            if kind == genl.CTRL_ATTR_OP_POLICY:
                for op, _r, nest in genl.iter_attrs(payload):
                    ops[op] = genl.get_u32(dict((t, p) for t, _, p in genl.iter_attrs(nest))[1])
            elif kind == genl.CTRL_ATTR_POLICY:
                for index, _r, nest in genl.iter_attrs(payload):
                    for attr, _r2, desc_nest in genl.iter_attrs(nest):
                        fields = {t: p for t, _, p in genl.iter_attrs(desc_nest)}
                        policies.setdefault(index, {})[attr] = genl.get_u32(
                            fields[genl.NL_POLICY_TYPE_ATTR_TYPE])
    return ops, policies, types


def test_getpolicy_dumps_each_ops_policy_then_done():
    ops, policies, types = _dump(MAINLINE)
    assert ops == {hsnl.CMD_ACCEPT: 0, hsnl.CMD_DONE: 1}
    assert policies == {0: {2: 4}, 1: {1: 4, 2: 8, 3: 4}}  # u32 class; u32, s32, u32
    assert types[-1] == genl.NLMSG_DONE and set(types[:-1]) == {genl.GENL_ID_CTRL}


def test_the_tags_profile_declares_done_attribute_4_as_a_string():
    from kernel_sim.profile import TAGS

    _ops, policies, _types = _dump(TAGS)
    assert policies[1][hsnl.A_DONE_TAG] == 12  # NL_ATTR_TYPE_NUL_STRING
    assert hsnl.A_DONE_TAG not in _dump(LINUX_6_12)[1][1]


def test_getpolicy_is_a_dump_and_can_be_narrowed_to_one_op():
    desc = hsnl.family_desc(MAINLINE, 0x22, (11, 12))
    with pytest.raises(genl.NetlinkError) as info:
        genl.ctrl_policy_dump(_policy_request(flags=1), [desc], portid=5)
    assert info.value.errno == -errno.EOPNOTSUPP
    one = genl.ctrl_policy_dump(_policy_request(op=hsnl.CMD_DONE), [desc], portid=5)
    assert len(list(genl.split_messages(one))) == 1 + 3 + 1  # the op, 3 attributes, DONE
    with pytest.raises(genl.NetlinkError):
        genl.ctrl_policy_dump(_policy_request(op=99), [desc], portid=5)
