"""PSK handshakes (NVMe/TCP) through the agent: agent against agent through kernel-sim's NVMe
host and target, and against OpenSSL and GnuTLS peers in both roles; SHA-256 and SHA-384
PSKs; failures with distinct DONE statuses and log lines that name the key, never its bytes."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from kernel_sim import keys
from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.nvme import NVMeHost, NVMeKeyring, NVMeTarget, psk_identity
from tests.sim.harness import Agent, recv_app_data, start_peer, start_server

pytestmark = pytest.mark.sim

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:host-1"
SUBNQN = "nqn.2026-11.test.tlshd:subsys-1"
KEY_LEN = {1: 32, 2: 48}


@pytest.fixture
def nvme_keyring() -> Iterator[NVMeKeyring]:
    ring = NVMeKeyring.create()
    yield ring
    ring.close()


def _queue(kernel: Kernel, host: NVMeHost, target: NVMeTarget):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    result: dict[str, object] = {}

    def target_side() -> None:
        result["target"] = target.handshake(server)
        if result["target"].status == 0:  # type: ignore[attr-defined]
            result["icreq"] = target.serve_icreq()

    thread = threading.Thread(target=target_side)
    thread.start()
    host_out = host.connect(client)
    icresp = host.init_connection() if host_out.status == 0 else None
    thread.join(20)
    kernel.sock_release(client)
    kernel.sock_release(server)
    return host_out, result["target"], icresp


@pytest.mark.parametrize("hmac, suite", [(1, "TLS_AES_128_GCM_SHA256"),
                                         (2, "TLS_AES_256_GCM_SHA384")])
def test_agent_host_and_agent_target_over_nvme_queues(kernel, agent: Agent, nvme_keyring, hmac,
              suite):
    serial = nvme_keyring.add_psk(psk_identity(HOSTNQN, SUBNQN, hmac), os.urandom(KEY_LEN[hmac]))
    host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=nvme_keyring.serial)
    target = NVMeTarget(kernel, keyring=nvme_keyring.serial)
    host_out, target_out, icresp = _queue(kernel, host, target)
    assert host_out.status == 0 and target_out.status == 0
    assert host.tls_pskid == serial and target.tls_pskid == serial  # REMOTE_AUTH = the PSK
    assert icresp is not None and icresp[0] == 0x01  # ICResp came back through kTLS
    ciphers = [line for line in agent.log[-2:] if f"cipher={suite}" in line]
    assert len(ciphers) == 2, agent.log[-2:]
    assert all(f"psk={serial}:" in line for line in agent.log[-2:])


def test_unknown_identity_is_ekeyrejected_with_the_alert(kernel, agent, nvme_keyring):
    other = NVMeKeyring.create(name="kernel-sim:other")
    try:
        serial = other.add_psk(psk_identity(HOSTNQN, SUBNQN, 1), os.urandom(32))
        host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=other.serial)
        target = NVMeTarget(kernel, keyring=nvme_keyring.serial)  # empty: knows no identity
        host_out, target_out, _ = _queue(kernel, host, target)
    finally:
        other.close()
    assert target_out.status == -errno.EKEYREJECTED
    assert host_out.status == -errno.EKEYREJECTED  # the client saw unknown_psk_identity
    log = "\n".join(agent.log[-2:])
    assert "no PSK key for identity" in log and f"psk={serial}:" in log


def test_wrong_key_for_a_known_identity_is_eacces_on_both_sides(kernel, agent, nvme_keyring):
    identity = psk_identity(HOSTNQN, SUBNQN, 1)
    other = NVMeKeyring.create(name="kernel-sim:other")
    try:
        other.add_psk(identity, os.urandom(32))
        nvme_keyring.add_psk(identity, os.urandom(32))
        host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=other.serial)
        target = NVMeTarget(kernel, keyring=nvme_keyring.serial)
        host_out, target_out, _ = _queue(kernel, host, target)
    finally:
        other.close()
    assert host_out.status == -errno.EACCES and target_out.status == -errno.EACCES


def test_revoked_psk_is_ekeyrevoked(kernel, agent, nvme_keyring):
    serial = nvme_keyring.add_psk(psk_identity(HOSTNQN, SUBNQN, 1), os.urandom(32))
    keys.revoke(serial)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    out = TLSConsumer(kernel).psk_client(client, (serial,), keyring=nvme_keyring.serial)
    assert out.status == -errno.EKEYREVOKED
    assert f"key {serial}" in agent.log[-1] and "revoked" in agent.log[-1]
    kernel.sock_release(client)
    server.close()


def test_psk_without_read_permission_is_eacces(kernel, agent, nvme_keyring):
    key = os.urandom(32)
    serial = nvme_keyring.add_psk(psk_identity(HOSTNQN, SUBNQN, 1), key)
    keys.set_perm(serial, 0x01010000)  # view only, for possessor and user
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    out = TLSConsumer(kernel).psk_client(client, (serial,), keyring=nvme_keyring.serial)
    assert out.status == -errno.EACCES
    assert f"key {serial}" in agent.log[-1]
    assert key.hex() not in "\n".join(agent.log)
    kernel.sock_release(client)
    server.close()


# --- independent peers -------------------------------------------------------------------


def test_agent_client_against_openssl_psk_server(kernel, agent, nvme_keyring):
    identity, key = "NVMe0R01 openssl-host openssl-subsys", os.urandom(32)
    serial = nvme_keyring.add_psk(identity, key)
    peer, port = start_server(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-nocert",
        "-psk_identity", identity, "-psk", key.hex(), "-rev",
        "-num_tickets", "0"])
    try:
        client = socket.create_connection(("127.0.0.1", port))
        consumer = TLSConsumer(kernel)
        out = consumer.psk_client(client, (serial,), keyring=nvme_keyring.serial)
        assert out.status == 0 and out.peerid == serial, agent.log[-3:]
        assert consumer.ktls is not None
        consumer.ktls.sendmsg(b"psk data\n")
        assert recv_app_data(consumer, 9)[0] == b"atad ksp\n"
        kernel.sock_release(client)
    finally:
        peer.close()


def test_agent_server_against_openssl_psk_client(kernel, agent, nvme_keyring):
    identity, key = "NVMe0R01 openssl-host openssl-subsys", os.urandom(32)
    serial = nvme_keyring.add_psk(identity, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = start_peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                           "-psk_identity", identity, "-psk", key.hex(), "-quiet"])
        try:
            conn, _ = listener.accept()
            consumer = TLSConsumer(kernel)
            out = consumer.psk_server(conn, keyring=nvme_keyring.serial)
            assert out.status == 0 and out.peerid == serial, agent.log[-3:]
            peer.write(b"from openssl\n")
            assert recv_app_data(consumer, 13)[0] == b"from openssl\n"
            assert consumer.ktls is not None
            consumer.ktls.sendmsg(b"from the kernel\n")
            assert b"from the kernel" in peer.read_until(b"from the kernel")
            kernel.sock_release(conn)
        finally:
            peer.close()


def _gnutls_priority(hmac: int) -> str:
    cipher = "AES-256-GCM" if hmac == 2 else "AES-128-GCM"
    return f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{cipher}:+PSK:+ECDHE-PSK:+DHE-PSK"


# GnuTLS 3.7.9 (Debian bookworm) computes external-PSK binders with SHA-256 only: against a
# SHA-384 PSK it fails (illegal_parameter / a binder that does not verify). SHA-384 interop is
# proven against OpenSSL's own PSK session files below.
@pytest.mark.parametrize("hmac", [1])
def test_agent_client_against_gnutls_psk_server(kernel, agent, nvme_keyring, tmp_path, hmac):
    identity, key = psk_identity("gnutls-host", "gnutls-subsys", hmac), os.urandom(KEY_LEN[hmac])
    serial = nvme_keyring.add_psk(identity, key)
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"{identity}:{key.hex()}\n")
    peer, port = start_server(lambda port: [
        "gnutls-serv", "--echo", "-p", str(port), "--pskpasswd", str(passwd),
        "--priority", _gnutls_priority(hmac)])
    try:
        client = socket.create_connection(("127.0.0.1", port))
        consumer = TLSConsumer(kernel)
        out = consumer.psk_client(client, (serial,), keyring=nvme_keyring.serial)
        assert out.status == 0, agent.log[-3:]
        assert consumer.ktls is not None
        consumer.ktls.sendmsg(b"echo over psk\n")
        assert recv_app_data(consumer, 14)[0] == b"echo over psk\n"
        kernel.sock_release(client)
    finally:
        peer.close()
    suite = "TLS_AES_256_GCM_SHA384" if hmac == 2 else "TLS_AES_128_GCM_SHA256"
    assert f"cipher={suite}" in agent.log[-1]


@pytest.mark.parametrize("hmac", [1])
def test_agent_server_against_gnutls_psk_client(kernel, agent, nvme_keyring, hmac):
    identity, key = psk_identity("gnutls-host", "gnutls-subsys", hmac), os.urandom(KEY_LEN[hmac])
    serial = nvme_keyring.add_psk(identity, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = start_peer(["gnutls-cli", "-p", str(port), "127.0.0.1", "--pskusername", identity,
                           "--pskkey", key.hex(), "--priority", _gnutls_priority(hmac)])
        try:
            conn, _ = listener.accept()
            consumer = TLSConsumer(kernel)
            out = consumer.psk_server(conn, keyring=nvme_keyring.serial)
            assert out.status == 0 and out.peerid == serial, agent.log[-3:]
            peer.read_until(b"Handshake was completed")
            peer.write(b"from gnutls\n")
            assert recv_app_data(consumer, 12)[0] == b"from gnutls\n"
            kernel.sock_release(conn)
        finally:
            peer.close()


def test_unknown_identity_from_an_independent_client_gets_the_alert(kernel, agent,
                            nvme_keyring):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                 "-tls1_3", "-psk_identity", "nobody-knows-me", "-psk",
                                 os.urandom(32).hex()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        conn, _ = listener.accept()
        out = TLSConsumer(kernel).psk_server(conn, keyring=nvme_keyring.serial)
        output, _ = peer.communicate(timeout=10)
    assert out.status == -errno.EKEYREJECTED
    assert "unknown psk identity" in output.lower()
    kernel.sock_release(conn)


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag, len(body)]) + body


def write_psk_session(path, key: bytes, suite: bytes):
    """An OpenSSL ``SSL SESSION PARAMETERS`` PEM (the SSL_SESSION ASN.1, written by hand):
    version 1, TLS 1.3, the suite (whose hash is the PSK's), empty id, the key."""
    import base64

    der = _der(0x30, _der(0x02, b"\x01") + _der(0x02, b"\x03\x04") + _der(0x04, suite)
               + _der(0x04, b"") + _der(0x04, key))
    path.write_text("-----BEGIN SSL SESSION PARAMETERS-----\n"
                    + base64.encodebytes(der).decode()
                    + "-----END SSL SESSION PARAMETERS-----\n")
    return path


@pytest.mark.parametrize("hmac, suite_id, suite", [
    (1, b"\x13\x01", "_SHA256"), (2, b"\x13\x02", "TLS_AES_256_GCM_SHA384")])
def test_agent_client_against_openssl_psk_session_server(kernel, agent, nvme_keyring, tmp_path,
                  hmac, suite_id, suite):
    identity, key = psk_identity("ossl-host", "ossl-subsys", hmac), os.urandom(KEY_LEN[hmac])
    serial = nvme_keyring.add_psk(identity, key)
    session = write_psk_session(tmp_path / "psk.pem", key, suite_id)
    peer, port = start_server(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-nocert",
        "-psk_identity", identity, "-psk_session", str(session), "-rev",
        "-num_tickets", "0"])
    try:
        client = socket.create_connection(("127.0.0.1", port))
        consumer = TLSConsumer(kernel)
        out = consumer.psk_client(client, (serial,), keyring=nvme_keyring.serial)
        assert out.status == 0 and out.peerid == serial, agent.log[-3:]
        assert consumer.ktls is not None
        consumer.ktls.sendmsg(b"sha-2 psk\n")
        assert recv_app_data(consumer, 10)[0] == b"ksp 2-ahs\n"
        kernel.sock_release(client)
    finally:
        peer.close()
    cipher = agent.log[-1].split("cipher=", 1)[1].split()[0]
    assert cipher.endswith(suite)  # the suite's hash is the PSK's


@pytest.mark.parametrize("hmac, suite_id, suite", [
    (1, b"\x13\x01", "_SHA256"), (2, b"\x13\x02", "TLS_AES_256_GCM_SHA384")])
def test_agent_server_against_openssl_psk_session_client(kernel, agent, nvme_keyring, tmp_path,
                  hmac, suite_id, suite):
    identity, key = psk_identity("ossl-host", "ossl-subsys", hmac), os.urandom(KEY_LEN[hmac])
    serial = nvme_keyring.add_psk(identity, key)
    session = write_psk_session(tmp_path / "psk.pem", key, suite_id)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = start_peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                           "-psk_identity", identity, "-psk_session", str(session), "-quiet"])
        try:
            conn, _ = listener.accept()
            consumer = TLSConsumer(kernel)
            out = consumer.psk_server(conn, keyring=nvme_keyring.serial)
            assert out.status == 0 and out.peerid == serial, agent.log[-3:]
            peer.write(b"hello over sha-2\n")
            assert recv_app_data(consumer, 17)[0] == b"hello over sha-2\n"
            kernel.sock_release(conn)
        finally:
            peer.close()
    cipher = agent.log[-1].split("cipher=", 1)[1].split()[0]
    assert cipher.endswith(suite)  # the suite's hash is the PSK's


def test_configured_keyrings_serve_a_kernel_without_the_keyring_attribute(pki, tmp_path):
    """Linux 6.12 sends no KEYRING attribute: the target's PSK is found only because
    `[authenticate] keyrings` linked its keyring into the agent's session keyring."""
    from kernel_sim.profile import LINUX_6_12
    from tests.sim.harness import start_agent, unique_endpoint, write_config

    name = f"tlshd-test-{os.getpid()}-nvme"
    ring = NVMeKeyring.create(name=name)
    try:
        serial = ring.add_psk(psk_identity(HOSTNQN, SUBNQN, 2), os.urandom(48))
        with Kernel(endpoint=unique_endpoint(), profile=LINUX_6_12) as kernel:
            kernel.add_netns(None)
            agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint,
             keyrings=name))
            try:
                host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=ring.serial)
                target = NVMeTarget(kernel, keyring=ring.serial)  # not sent on 6.12
                host_out, target_out, icresp = _queue(kernel, host, target)
                assert host_out.status == 0 and target_out.status == 0, agent.log[-3:]
                assert target.tls_pskid == serial and icresp is not None
                assert any(f"keyring {name}" in line for line in agent.log)
            finally:
                assert agent.stop() == 0
    finally:
        ring.close()


def test_a_configured_keyring_that_does_not_exist_is_skipped_and_the_agent_serves(pki, tmp_path):
    """ktls-utils src/tlshd/keyring.c (tlshd_keyring_link_session) logs and goes on: a
    `keyrings=.nvme` entry is common before the nvme module has created the keyring, and a
    refusal to start would leave a dead service at boot. `tlshd doctor` fails on it."""
    from tests.sim.harness import start_agent, unique_endpoint, write_config

    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint, keyrings="no-such-keyring-anywhere")
        agent = start_agent(kernel, config)
        try:
            assert any("no-such-keyring-anywhere" in line and "not found" in line
                       for line in agent.log)
            assert agent.proc.poll() is None
        finally:
            assert agent.stop() == 0


# --- a client with several keys (ktls-utils src/tlshd/client.c, tlshd_tls13_client_psk_handshake)


class Reconnecting(threading.Thread):
    """A server that keeps a connection open after refusing a ClientHello: it relays each
    attempt to a fresh connection to an OpenSSL server (which closes after its alert) and
    waits, with the client's connection open, for the next ClientHello."""

    def __init__(self, backend_port: int) -> None:
        super().__init__(daemon=True)
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.attempts = 0

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while True:
                first = conn.recv(65536)  # a ClientHello (or the end)
                if not first:
                    return
                self.attempts += 1
                with socket.create_connection(("127.0.0.1", self.backend_port)) as backend:
                    backend.sendall(first)
                    if not self._relay(conn, backend):
                        return

    @staticmethod
    def _relay(conn: socket.socket, backend: socket.socket) -> bool:
        """Until the backend closes (True: keep the client) or the client does (False)."""
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(conn, selectors.EVENT_READ, backend)
            sel.register(backend, selectors.EVENT_READ, conn)
            while True:
                for key, _ in sel.select(10):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return key.fileobj is backend
                    key.data.sendall(data)


def _openssl_psk_server(identity: str, key: bytes):
    peer, port = start_server(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3",
        "-nocert", "-psk_identity", identity, "-psk", key.hex(), "-rev",
        "-num_tickets", "0"])
    return peer, port


def test_a_refused_key_is_followed_by_the_next_on_the_same_connection(kernel, agent,
                             nvme_keyring):
    stale = nvme_keyring.add_psk("NVMe0R01 host-a subsys-old", os.urandom(32))
    identity, key = "NVMe0R01 host-a subsys-new", os.urandom(32)
    good = nvme_keyring.add_psk(identity, key)
    peer, port = _openssl_psk_server(identity, key)  # knows only the second key
    relay = Reconnecting(port)
    relay.start()
    try:
        client = socket.create_connection(("127.0.0.1", relay.port))
        consumer = TLSConsumer(kernel)
        out = consumer.psk_client(client, (stale, good), keyring=nvme_keyring.serial)
        assert out.status == 0 and out.peerid == good, agent.log[-3:]
        assert relay.attempts == 2
        assert consumer.ktls is not None
        consumer.ktls.sendmsg(b"second key\n")
        assert recv_app_data(consumer, 11)[0] == b"yek dnoces\n"
        kernel.sock_release(client)
    finally:
        peer.close()
        relay.listener.close()
    log = "\n".join(agent.log)
    assert f"PSK {stale} refused by the server" in log and f"trying key {good}" in log
    assert f"psk={good}:" in agent.log[-1] and key.hex() not in log


def test_a_server_that_closes_after_refusing_gets_no_second_hello(kernel, agent, nvme_keyring):
    stale = nvme_keyring.add_psk("NVMe0R01 host-a subsys-old", os.urandom(32))
    identity, key = "NVMe0R01 host-a subsys-new", os.urandom(32)
    good = nvme_keyring.add_psk(identity, key)
    peer, port = _openssl_psk_server("NVMe0R01 someone else", os.urandom(32))
    try:
        client = socket.create_connection(("127.0.0.1", port))
        out = TLSConsumer(kernel).psk_client(client, (stale, good), keyring=nvme_keyring.serial)
        kernel.sock_release(client)
    finally:
        peer.close()
    # the refusal of the first key is the outcome (EACCES), not the dropped connection a
    # hello on a closed connection would meet (ETIMEDOUT)
    assert out.status == -errno.EACCES, agent.log[-3:]
    assert f"psk={stale}:" in agent.log[-1] or f"psk={good}:" in agent.log[-1]


def test_the_first_key_that_works_ends_the_search(kernel, agent, nvme_keyring):
    identity, key = "NVMe0R01 host-a subsys-new", os.urandom(32)
    good = nvme_keyring.add_psk(identity, key)
    unused = nvme_keyring.add_psk("NVMe0R01 host-a subsys-other", os.urandom(32))
    peer, port = _openssl_psk_server(identity, key)
    relay = Reconnecting(port)
    relay.start()
    try:
        client = socket.create_connection(("127.0.0.1", relay.port))
        out = TLSConsumer(kernel).psk_client(client, (good, unused), keyring=nvme_keyring.serial)
        assert out.status == 0 and out.peerid == good
        assert relay.attempts == 1
        kernel.sock_release(client)
    finally:
        peer.close()
        relay.listener.close()


@pytest.mark.parametrize("hmac", [1, 2])
def test_secure_concatenation_generated_psks_then_a_target_reset(kernel, agent: Agent,
                                                                 nvme_keyring, hmac):
    """Issue 13: NVMe secure concatenation (TP 8018). DH-HMAC-CHAP derives a TLS PSK whose
    identity is ``NVMe1G<hh> <hostnqn> <subnqn> <digest>``; the host names it (tls_key) and the
    target finds it by that identity, as with retained keys. After a target reset the target
    holds a new generated key: the host's stale one is refused with unknown_psk_identity, so
    the host's DONE is EKEYREJECTED (and the kernel re-authenticates); the new key works."""
    key_len = KEY_LEN[hmac]
    stale_id = psk_identity(HOSTNQN, SUBNQN, hmac, version=1, generated=True,
                            digest="c3RhbGUtZGlnZXN0Cg==")
    first = nvme_keyring.add_psk(stale_id, os.urandom(key_len))
    target = NVMeTarget(kernel, keyring=nvme_keyring.serial)
    host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=nvme_keyring.serial,
                    tls_key=first)
    host_out, target_out, icresp = _queue(kernel, host, target)
    assert host_out.status == 0 and target_out.status == 0 and icresp is not None
    assert host.tls_pskid == first and target.tls_pskid == first
    assert all(f"psk={first}:" in line and f"NVMe1G0{hmac} " in line
               for line in agent.log[-2:]), agent.log[-2:]

    # the reset: the target's controller re-authenticates and holds only the new key
    host_ring = NVMeKeyring.create(name="kernel-sim:host-side")
    try:
        stale = host_ring.add_psk(stale_id, os.urandom(key_len))
        keys.revoke(first)
        new_id = psk_identity(HOSTNQN, SUBNQN, hmac, version=1, generated=True,
                              digest="bmV3LWRpZ2VzdAo=")
        fresh = nvme_keyring.add_psk(new_id, os.urandom(key_len))
        old_host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=host_ring.serial,
                            tls_key=stale)
        host_out, target_out, _ = _queue(kernel, old_host, target)
        assert target_out.status == -errno.EKEYREJECTED
        assert host_out.status == -errno.EKEYREJECTED  # unknown_psk_identity came back
    finally:
        host_ring.close()
    new_host = NVMeHost(kernel, hostnqn=HOSTNQN, subnqn=SUBNQN, keyring=nvme_keyring.serial,
                        tls_key=fresh)
    host_out, target_out, icresp = _queue(kernel, new_host, target)
    assert host_out.status == 0 and target_out.status == 0 and icresp is not None
    assert new_host.tls_pskid == fresh
