"""kernel-sim's NVMe/TCP consumers: PSK choice, upcall arguments, done checks, reads.

The PSKs live in a real keyring (kernel_sim.nvme.NVMeKeyring). The agent is the
raw test agent: it accepts, installs fixed kTLS keys by hand on both queues and
sends DONE, so no TLS library (and no PSK support in tlshd) is needed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rawagent as ra
from rawagent import KEY_A, KEY_B, RawAgent

from kernel_sim import genl, keys
from kernel_sim.kernel import Kernel
from kernel_sim.nvme import (
    NVME_TCP_ICREQ,
    NVME_TCP_ICRESP,
    NVME_TCP_TLS_CIPHER_SHA256,
    NVME_TCP_TLS_CIPHER_SHA384,
    PSK_PRIORITY,
    PSK_SIZES,
    NVMeHost,
    NVMeKeyring,
    NVMeTarget,
    icreq_pdu,
    psk_identity,
    tls_key_lookup,
    tls_psk_default,
)
from kernel_sim.profile import LINUX_6_12, MAINLINE, KernelProfile

# Fixtures shared by the kernel-sim test files (defined in rawagent; no_leaks is autouse).
no_leaks, endpoint, stack, boot, kernel = ra.no_leaks, ra.endpoint, ra.stack, ra.boot, ra.kernel
connect, agent, pair, fds = ra.connect, ra.agent, ra.pair, ra.fds

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0c4f1c2a-1111-2222-3333-444455556666"
SUBNQN = "nqn.2024-01.io.example:subsys1"
DIGEST = "Zm9vYmFyZGlnZXN0Zm9vYmFyZGlnZXN0Zm9vYmFyZGk="
A_TIMEOUT, A_AUTH_MODE, A_PEER_IDENTITY, A_KEYRING, A_MESSAGE_TYPE = 4, 5, 6, 9, 3
CLIENTHELLO, SERVERHELLO, AUTH_PSK = 1, 2, 2
ALERT, HANDSHAKE = 21, 22


@pytest.fixture
def nvme_keyring() -> Iterator[NVMeKeyring]:
    ring = NVMeKeyring.create()
    yield ring
    ring.close()


def add_psk(ring: NVMeKeyring, hmac: int = NVME_TCP_TLS_CIPHER_SHA256, *, version: int = 0,
            generated: bool = False, subnqn: str = SUBNQN) -> int:
    digest = DIGEST if version == 1 else None
    identity = psk_identity(HOSTNQN, subnqn, hmac, version=version, generated=generated,
                            digest=digest)
    return ring.add_psk(identity, bytes([hmac]) * PSK_SIZES[hmac])


def host_for(kernel: Kernel, ring: NVMeKeyring, **kwargs: Any) -> NVMeHost:
    return NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=ring.serial, **kwargs)


@contextlib.contextmanager
def in_background(fn: Callable[..., Any], *args: Any) -> Iterator[concurrent.futures.Future[Any]]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(fn, *args)


def accept_one(agent: RawAgent, fds: Any) -> tuple[ra.Reply, int]:
    assert agent.read_ready() is not None
    reply = agent.accept()
    return reply, fds(reply)


# --- identities and lookup (drivers/nvme/common/keyring.c) ---------------------------


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"hmac": 1}, f"NVMe0R01 {HOSTNQN} {SUBNQN}"),
    ({"hmac": 2}, f"NVMe0R02 {HOSTNQN} {SUBNQN}"),
    ({"hmac": 1, "version": 1, "digest": DIGEST}, f"NVMe1R01 {HOSTNQN} {SUBNQN} {DIGEST}"),
    ({"hmac": 2, "version": 1, "generated": True, "digest": DIGEST},
     f"NVMe1G02 {HOSTNQN} {SUBNQN} {DIGEST}"),
], ids=["v0-sha256", "v0-sha384", "v1-retained", "v1-generated"])
def test_psk_identity_formats(kwargs: dict[str, Any], expected: str) -> None:
    assert psk_identity(HOSTNQN, SUBNQN, **kwargs) == expected


def test_a_psk_is_a_user_key_with_the_identity_as_description_and_the_raw_psk(
        nvme_keyring: NVMeKeyring) -> None:
    serial = add_psk(nvme_keyring, NVME_TCP_TLS_CIPHER_SHA384)

    desc = keys.describe_key(serial)

    assert (desc.type, desc.description) == ("user", f"NVMe0R02 {HOSTNQN} {SUBNQN}")
    assert keys.read_key(serial) == b"\x02" * 48
    assert keys.describe_key(nvme_keyring.serial).type == "keyring"


def test_default_psk_follows_the_kernels_priority_order(nvme_keyring: NVMeKeyring) -> None:
    serials = {entry: add_psk(nvme_keyring, entry[2], version=entry[1], generated=entry[0])
               for entry in reversed(PSK_PRIORITY)}
    chosen = []

    for _entry in PSK_PRIORITY:
        best = tls_psk_default(nvme_keyring.serial, HOSTNQN, SUBNQN)
        chosen.append(best)
        keys.invalidate(best)

    assert chosen == [serials[entry] for entry in PSK_PRIORITY]
    assert tls_psk_default(nvme_keyring.serial, HOSTNQN, SUBNQN) == 0


def test_priority_is_retained_then_version_1_then_sha384() -> None:
    assert PSK_PRIORITY[:4] == ((False, 1, 2), (False, 1, 1), (False, 0, 2), (False, 0, 1))
    assert [generated for generated, _v, _h in PSK_PRIORITY[4:]] == [True] * 4


def test_a_version_1_psk_is_found_by_a_query_without_its_digest(
        nvme_keyring: NVMeKeyring) -> None:
    serial = add_psk(nvme_keyring, version=1)

    assert tls_psk_default(nvme_keyring.serial, HOSTNQN, SUBNQN) == serial


def test_lookup_skips_other_subsystems_revoked_keys_and_nested_keyrings(
        nvme_keyring: NVMeKeyring) -> None:
    add_psk(nvme_keyring, subnqn="nqn.2024-01.io.example:other")
    keys.revoke(add_psk(nvme_keyring, NVME_TCP_TLS_CIPHER_SHA384))
    nested = keys.new_keyring("nested", nvme_keyring.serial)
    keys.add_key("user", psk_identity(HOSTNQN, SUBNQN, 1), b"\x01" * 32, nested)

    assert tls_psk_default(nvme_keyring.serial, HOSTNQN, SUBNQN) == 0


def test_prefix_match_also_finds_a_subsystem_nqn_that_extends_the_wanted_one(
        nvme_keyring: NVMeKeyring) -> None:
    longer = add_psk(nvme_keyring, subnqn=SUBNQN + "-2")  # nvme_tls_psk_match's memcmp

    assert tls_psk_default(nvme_keyring.serial, HOSTNQN, SUBNQN) == longer


def test_key_lookup_tells_live_revoked_and_missing_keys_apart(
        nvme_keyring: NVMeKeyring) -> None:
    live, revoked = add_psk(nvme_keyring), add_psk(nvme_keyring, NVME_TCP_TLS_CIPHER_SHA384)
    keys.revoke(revoked)

    assert tls_key_lookup(live) == live
    for serial, expected in ((revoked, errno.EKEYREVOKED), (0, errno.ENOKEY),
                             (0x7FFFFFF0, errno.ENOKEY)):
        with pytest.raises(OSError) as info:
            tls_key_lookup(serial)
        assert info.value.errno == expected


# --- host (drivers/nvme/host/tcp.c) ----------------------------------------------------


def test_host_without_any_psk_fails_with_enokey_before_any_upcall(
        kernel: Kernel, agent: RawAgent, pair: Any, nvme_keyring: NVMeKeyring) -> None:
    host = host_for(kernel, nvme_keyring)

    outcome = host.connect(pair()[0])

    assert outcome.status == -errno.ENOKEY
    assert kernel.events("submit") == [] and agent.read_ready(timeout=0.1) is None


@pytest.mark.parametrize("profile", [MAINLINE, LINUX_6_12], ids=["mainline", "6.12"])
def test_host_upcall_carries_the_psk_its_keyring_and_a_10_s_timeout(
        boot: Callable[..., Kernel], connect: Callable[..., RawAgent], pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring, profile: KernelProfile) -> None:
    kernel = boot(profile)
    agent = connect()
    pskid = add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring)

    with in_background(host.connect, pair()[0]) as connecting:
        reply, fd = accept_one(agent, fds)
        agent.done(fd, 0, (pskid,))
        assert connecting.result(timeout=5).status == 0

    assert reply.u32(A_MESSAGE_TYPE) == CLIENTHELLO and reply.u32(A_AUTH_MODE) == AUTH_PSK
    assert [genl.get_u32(p) for p in reply.all(A_PEER_IDENTITY)] == [pskid]
    assert reply.u32(A_TIMEOUT) == 10000
    expected_keyring = [nvme_keyring.serial] if profile.accept_keyring else []
    assert [genl.get_u32(p) for p in reply.all(A_KEYRING)] == expected_keyring


def test_a_configured_tls_key_is_used_without_searching(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    add_psk(nvme_keyring, NVME_TCP_TLS_CIPHER_SHA384)
    configured = add_psk(nvme_keyring, subnqn="nqn.elsewhere")
    host = host_for(kernel, nvme_keyring, tls_key=configured)

    with in_background(host.connect, pair()[0]) as connecting:
        reply, fd = accept_one(agent, fds)
        agent.done(fd, 0, (configured,))
        connecting.result(timeout=5)

    assert [genl.get_u32(p) for p in reply.all(A_PEER_IDENTITY)] == [configured]


@pytest.mark.parametrize(("break_key", "key_error"), [
    ("revoke", errno.EKEYREVOKED), ("none", errno.ENOKEY), ("unknown", errno.ENOKEY)])
def test_host_rejects_a_done_whose_peer_id_is_not_a_live_key_with_enokey(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any, nvme_keyring: NVMeKeyring,
        break_key: str, key_error: int) -> None:
    pskid = add_psk(nvme_keyring)
    remote = {"revoke": (pskid,), "none": (), "unknown": (0x7FFFFFF0,)}[break_key]
    host = host_for(kernel, nvme_keyring)

    with in_background(host.connect, pair()[0]) as connecting:
        _reply, fd = accept_one(agent, fds)
        if break_key == "revoke":
            keys.revoke(pskid)
        agent.done(fd, 0, remote)
        outcome = connecting.result(timeout=5)

    assert outcome.status == -errno.ENOKEY
    assert host.key_error == key_error and host.tls_pskid == 0


def test_host_accepts_a_done_whose_peer_id_is_a_live_key(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    pskid = add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring)

    with in_background(host.connect, pair()[0]) as connecting:
        _reply, fd = accept_one(agent, fds)
        agent.done(fd, 0, (pskid,))
        outcome = connecting.result(timeout=5)

    assert (outcome.status, outcome.peerid, host.tls_pskid) == (0, pskid, pskid)
    assert host.key_error is None


def test_host_reports_a_failed_handshake_status(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring)

    with in_background(host.connect, pair()[0]) as connecting:
        _reply, fd = accept_one(agent, fds)
        agent.done(fd, errno.EKEYREJECTED)
        outcome = connecting.result(timeout=5)

    assert outcome.status == -errno.EKEYREJECTED and host.key_error is None


def test_host_cancels_after_its_timeout(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring, timeout_s=0.3)

    with in_background(host.connect, pair()[0]) as connecting:
        reply, _fd = accept_one(agent, fds)
        outcome = connecting.result(timeout=5)

    assert outcome.status == -errno.ETIMEDOUT and reply.u32(A_TIMEOUT) == 300


# --- target (drivers/nvme/target/tcp.c) -------------------------------------------------


def test_target_upcall_is_a_psk_serverhello_with_one_zero_peer_identity(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    target = NVMeTarget(kernel, keyring=nvme_keyring.serial)
    pskid = add_psk(nvme_keyring)

    with in_background(target.handshake, pair()[1]) as handshaking:
        reply, fd = accept_one(agent, fds)
        agent.done(fd, 0, (pskid,))
        outcome = handshaking.result(timeout=5)

    assert reply.u32(A_MESSAGE_TYPE) == SERVERHELLO and reply.u32(A_AUTH_MODE) == AUTH_PSK
    assert [genl.get_u32(p) for p in reply.all(A_PEER_IDENTITY)] == [0]
    assert reply.u32(A_TIMEOUT) == 10000 and reply.u32(A_KEYRING) == nvme_keyring.serial
    assert outcome.status == 0 and target.tls_pskid == pskid


def test_target_peek_tells_a_plain_icreq_from_a_tls_clienthello(pair: Any) -> None:
    host_sock, target_sock = pair()
    host_sock.sendall(icreq_pdu())
    assert NVMeTarget.peek_is_icreq(target_sock)
    assert len(target_sock.recv(128)) == 128

    host_sock.sendall(bytes([22, 3, 1, 0, 200]) + bytes(8))  # a ClientHello record header

    assert not NVMeTarget.peek_is_icreq(target_sock)


# --- both ends over agent-installed kTLS ------------------------------------------------


@pytest.fixture
def tls_queue(kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
              nvme_keyring: NVMeKeyring) -> tuple[NVMeHost, NVMeTarget, int]:
    """Host and target on one TCP connection, handshaken by the raw agent with fixed keys."""
    pskid = add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring)
    target = NVMeTarget(kernel, keyring=nvme_keyring.serial)
    host_sock, target_sock = pair()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        connecting = pool.submit(host.connect, host_sock)
        handshaking = pool.submit(target.handshake, target_sock)
        for _ in range(2):
            reply, fd = accept_one(agent, fds)
            client = reply.u32(A_MESSAGE_TYPE) == CLIENTHELLO
            tx, rx = (KEY_A, KEY_B) if client else (KEY_B, KEY_A)
            ra.install_ktls(agent, fd, tx, rx)
            assert agent.done(fd, 0, (pskid,)) == 0
        assert connecting.result(timeout=5).status == 0
        assert handshaking.result(timeout=5).status == 0
    return host, target, pskid


def test_host_and_target_exchange_icreq_and_icresp_over_ktls(
        tls_queue: tuple[NVMeHost, NVMeTarget, int]) -> None:
    host, target, pskid = tls_queue

    with in_background(target.serve_icreq) as serving:
        icresp = host.init_connection()
        icreq = serving.result(timeout=5)

    assert icreq[0] == NVME_TCP_ICREQ and icresp[0] == NVME_TCP_ICRESP
    assert struct.unpack_from("<BBBBI", icresp) == (NVME_TCP_ICRESP, 0, 128, 0, 128)
    assert host.tls_pskid == target.tls_pskid == pskid
    assert host.ktls.tx_record_seq == host.ktls.rx_record_seq == 1


def test_host_read_sock_fails_with_einval_on_a_non_data_record(
        kernel: Kernel, agent: RawAgent, pair: Any, fds: Any,
        nvme_keyring: NVMeKeyring) -> None:
    pskid = add_psk(nvme_keyring)
    host = host_for(kernel, nvme_keyring)
    host_sock, peer = pair()
    with in_background(host.connect, host_sock) as connecting:
        _reply, fd = accept_one(agent, fds)
        ra.install_ktls(agent, fd, tx=KEY_A, rx=KEY_B)
        agent.done(fd, 0, (pskid,))
        assert connecting.result(timeout=5).status == 0

    peer.sendall(KEY_B.seal(0, bytes([4, 0, 0, 1, 0]), HANDSHAKE))  # NewSessionTicket-ish

    with pytest.raises(OSError) as info:
        host.recv_pdu()
    assert info.value.errno == errno.EINVAL


def test_target_discards_non_data_records_but_a_fatal_alert_is_enotconn(
        tls_queue: tuple[NVMeHost, NVMeTarget, int]) -> None:
    host, target, _pskid = tls_queue
    host.ktls.sendmsg(bytes([4, 0, 0, 1, 0]), HANDSHAKE)
    host.ktls.sendmsg(bytes([1, 0]), ALERT)  # warning close_notify: ignored
    host.send_pdu(icreq_pdu())

    assert target.recv_pdu()[0] == NVME_TCP_ICREQ

    host.ktls.sendmsg(bytes([2, 40]), ALERT)  # fatal handshake_failure
    with pytest.raises(OSError) as info:
        target.recv_pdu()
    assert info.value.errno == errno.ENOTCONN

