"""Attribute discovery: the agent reads the handshake family's policy (nlctrl GETPOLICY) and
sends an optional attribute only where the running kernel declares it. Against kernel-sim's
profiles; the real kernels' policies are checked in the real-kernel tier."""

from __future__ import annotations

import socket
import struct
import uuid
from collections.abc import Iterator
from types import MappingProxyType

import pytest

from kernel_sim.handshake.tlshd import TLSHandshakeArgs
from kernel_sim.kernel import Kernel
from kernel_sim.profile import LINUX_6_12, LINUX_7_3, TAGS, KernelProfile
from tlshd.errors import DecodeError
from tlshd.netlink import codec, spec
from tlshd.netlink.messages import DumpDone, FamilyPolicy, PolicyPart
from tlshd.upcall import SimUpcall

DONE = spec.HandshakeCmd.DONE


@pytest.fixture(params=[LINUX_6_12, LINUX_7_3, TAGS], ids=lambda p: p.name)
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    profile: KernelProfile = request.param
    with Kernel(endpoint=f"tlshd-test-{uuid.uuid4().hex[:10]}", profile=profile) as k:
        k.add_netns(None)
        yield k


def test_the_policy_is_read_at_open_and_says_what_done_accepts(kernel: Kernel) -> None:
    up = SimUpcall(kernel.endpoint, join=False)
    try:
        assert up.policy is not None
        print(kernel.profile.name, up.policy.describe({2: "ACCEPT", 3: "DONE"}))
        assert dict(up.policy.ops[spec.HandshakeCmd.ACCEPT]) == {2: 4}  # handler class, u32
        done = dict(up.policy.ops[DONE])
        assert {1: 4, 2: 8, 3: 4}.items() <= done.items()  # status u32, sockfd s32, u32
        assert up.session_tags is (kernel.profile.name == "tags")
    finally:
        up.close()


def test_an_attribute_the_policy_lacks_is_never_sent(kernel: Kernel) -> None:
    """A kernel whose DONE would not take REMOTE_AUTH: the agent leaves it out (a strict
    kernel would refuse the whole DONE with EINVAL, and the consumer would see no status)."""
    up = SimUpcall(kernel.endpoint)
    calls: list[tuple[int, int]] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        consumer = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    try:
        args = TLSHandshakeArgs(sock=consumer, done=lambda _d, status, peerid: calls.append(
            (status, peerid)))  # type: ignore[arg-type]
        assert kernel.tls_client_hello_anon(args) == 0
        reply = up.accept()
        assert reply is not None
        assert up.policy is not None
        up.policy = FamilyPolicy(MappingProxyType({
            **up.policy.ops, DONE: MappingProxyType({1: 4, 2: 8})}))
        up.done(reply.sockfd, 0, (1234,))
        assert kernel.wait_for(lambda: bool(calls), 5)
        assert calls == [(0, 0)]  # DONE arrived, without the serial (it would be 1234)
    finally:
        up.close()
        consumer.close()
        peer.close()


def test_without_a_policy_only_what_every_kernel_accepts_is_assumed() -> None:
    policy = FamilyPolicy.from_parts([])
    assert policy.ops == {} and not policy.accepts(DONE, 3)


def test_a_dump_decodes_into_parts_and_done() -> None:
    """Bytes as the kernel sends them: FAMILY_ID, OP_POLICY > op > DO, POLICY > index >
    attribute > TYPE (plus a bound the agent skips), then NLMSG_DONE."""
    from kernel_sim import genl

    family = genl.nla_u16(1, 0x22)
    op_part = genl.genlmsg(0x10, 10, 2, family + genl.nla_nest(9, [genl.nla_nest(3, [
        genl.nla_u32(1, 1)])]), seq=7, flags=2)
    attr_part = genl.genlmsg(0x10, 10, 2, family + genl.nla_nest(8, [genl.nla_nest(1, [
        genl.nla_nest(1, [genl.nla_u32(1, 4), genl.nla(5, (4095).to_bytes(8, "little"))])])]),
        seq=7, flags=2)
    done = genl.NLMSG_HDR.pack(20, 3, 2, 7, 0) + b"\0\0\0\0"
    messages = codec.decode(op_part + attr_part + done, 0x22)
    assert [type(m) for m in messages] == [PolicyPart, PolicyPart, DumpDone]
    policy = FamilyPolicy.from_parts([m for m in messages if isinstance(m, PolicyPart)])
    assert dict(policy.ops[3]) == {1: 4}


def test_the_request_is_a_dump_for_the_family_id() -> None:
    data = codec.encode_get_policy(0x22, 5)
    _length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert (kind, flags & 0x301, seq) == (spec.GENL_ID_CTRL, 0x301, 5)
    assert data[16] == spec.CTRL_CMD_GETPOLICY
    with pytest.raises(ValueError):
        codec.encode_get_policy(0x10, 5)  # nlctrl itself is not a dynamic family


def test_a_policy_message_without_its_family_is_refused() -> None:
    from kernel_sim import genl

    with pytest.raises(DecodeError):
        codec.decode(genl.genlmsg(0x10, 10, 2, b"", seq=1), 0x22)
