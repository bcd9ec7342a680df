"""The agent as a daemon: agent-client vs agent-server through two consumers, robustness
against kernel faults, SIGTERM draining, the demo command."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from kernel_sim.consumer import NFSClient, NFSServer, TLSConsumer
from kernel_sim.kernel import Kernel
from tests.sim.harness import (
    client_handshake,
    recv_app_data,
    start_agent,
    unique_endpoint,
    write_config,
)

pytestmark = pytest.mark.sim


def _nfs_mount(kernel: Kernel, xprtsec: str, calls: int = 3, cert: int = 0, key: int = 0):
    listener = socket.create_server(("127.0.0.1", 0))
    server, result = NFSServer(kernel, xprtsec=xprtsec), {}

    def serve() -> None:
        conn, _ = listener.accept()
        result["server"] = server.handshake(conn)
        if result["server"][0].status == 0:
            result["served"] = server.serve(conn, calls)
        kernel.sock_release(conn)

    thread = threading.Thread(target=serve)
    thread.start()
    client = NFSClient(kernel, xprtsec=xprtsec, cert_serial=cert, privkey_serial=key)
    outcome = client.mount(socket.create_connection(listener.getsockname()), "localhost")
    verifiers = [client.null_call(x) for x in range(calls)] if outcome.status == 0 else []
    client.close()
    thread.join(15)
    listener.close()
    return outcome, result["server"], result.get("served"), verifiers


@pytest.mark.parametrize("xprtsec", ["tls", "mtls"])
def test_agent_client_and_agent_server_through_nfs_consumers(kernel, agent, xprtsec):
    outcome, (server_outcome, peer_auth), served, verifiers = _nfs_mount(kernel, xprtsec)
    assert outcome.status == 0 and server_outcome.status == 0
    assert peer_auth is (xprtsec == "mtls")  # a client certificate only for mtls
    assert served == 3 and verifiers == [b""] * 3


def test_lost_ready_is_recovered_by_the_accept_sweep(kernel, agent):
    kernel.faults.drop_ready = 1
    started = time.monotonic()
    outcome, (server_outcome, _), _, _ = _nfs_mount(kernel, "tls", calls=1)
    assert outcome.status == 0 and server_outcome.status == 0
    assert kernel.events("ready_dropped")
    # within the one-second ACCEPT sweep, not the consumer's 10 s (or 20 s) timeout
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("mode", ["truncated", "bad_attr_len", "missing_sockfd",
                                  "missing_auth_mode", "no_fd"])
def test_malformed_accept_reply_gets_a_done_when_possible_and_agent_goes_on(kernel, agent, mode):
    kernel.faults.arm_malformed_accept(mode)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    outcome = TLSConsumer(kernel, timeout_s=3).client(client, peername="localhost")
    # With the fd in hand the agent answers DONE(EINVAL); without it the consumer times out.
    expected = -errno.ETIMEDOUT if mode == "no_fd" else -errno.EINVAL
    assert outcome.status == expected
    kernel.sock_release(client)
    conn.close()
    outcome, (server_outcome, _), _, _ = _nfs_mount(kernel, "tls", calls=1)
    assert outcome.status == 0 and server_outcome.status == 0


def test_unknown_attributes_in_accept_reply_are_tolerated(kernel, agent):
    kernel.faults.arm_malformed_accept("unknown_attrs")
    outcome, (server_outcome, _), _, _ = _nfs_mount(kernel, "tls", calls=1)
    assert outcome.status == 0 and server_outcome.status == 0


def test_sigterm_drains_in_flight_handshakes_then_exits_zero(pki, tmp_path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint))
        stop = threading.Event()
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=lambda: (listener.accept(), stop.wait(10)), daemon=True).start()
        result = {}
        waiter = threading.Thread(target=lambda: result.update(
            out=client_handshake(kernel, listener.getsockname()[1], timeout_ms=2000)[1]))
        waiter.start()
        assert kernel.wait_for(lambda: kernel.events("cmd_accept"), 5)
        agent.proc.send_signal(signal.SIGTERM)
        waiter.join(10)
        stop.set()
        assert agent.proc.wait(15) == 0
        assert result["out"].status == -errno.ETIMEDOUT  # DONE came; nothing was left hanging
        listener.close()


def test_demo_command_performs_real_handshakes():
    done = subprocess.run([sys.executable, "-m", "tlshd", "demo"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "xprtsec=tls: client status=0" in done.stdout
    assert "xprtsec=mtls: client status=0" in done.stdout
    assert "peer_authenticated=True" in done.stdout
    assert "3 RPC NULL calls answered over kTLS" in done.stdout


def test_agent_refuses_to_start_without_an_upcall(tmp_path, pki):
    config = write_config(tmp_path, pki, "no-such-endpoint")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tlshd", "-s", "-c", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "no-such-endpoint" in done.stderr
    assert time.monotonic() - started < 20


def test_recv_after_done_reads_only_kernel_records(kernel, agent, pki):
    """No byte of the handshake is left for the kernel, and none of its data was eaten."""
    _outcome, (server_outcome, _), served, verifiers = _nfs_mount(kernel, "mtls", calls=5)
    assert server_outcome.status == 0 and served == 5 and len(verifiers) == 5
    assert recv_app_data  # the interop tests read through the same path


def test_mtls_credentials_from_keyring_serials(pki, tmp_path):
    """The agent has no client certificate configured: only the keys named in ACCEPT."""
    from tlshd import keyring

    ring = keyring.KEY_SPEC_SESSION_KEYRING  # inherited by the agent: it possesses the keys
    cert = keyring.add_key("user", "tlshd-test:cert", pki.client.cert_der, ring)
    key = keyring.add_key("user", "tlshd-test:key", pki.client.key_der, ring)
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint,
                                                 client_cert=False))
        try:
            outcome, (server_outcome, peer_auth), served, _ = _nfs_mount(
                kernel, "mtls", calls=1, cert=cert, key=key)
            assert outcome.status == 0 and server_outcome.status == 0 and served == 1, (
                agent.log, kernel.events("submit_err"))
            assert peer_auth  # the server saw the certificate that came from the keyring
            keyring.revoke_key(key)
            outcome, _, _, _ = _nfs_mount(kernel, "mtls", calls=1, cert=cert, key=key)
            assert outcome.status == -errno.EACCES  # the NFS client maps EKEYREVOKED to EACCES
            assert "status=128" in "\n".join(agent.log)  # DONE said EKEYREVOKED
            outcome, _, _, _ = _nfs_mount(kernel, "mtls", calls=1, cert=cert, key=123456789)
            assert "status=126" in agent.log[-1] or "status=126" in "\n".join(agent.log[-3:])
        finally:
            assert agent.stop() == 0
