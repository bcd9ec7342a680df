"""The agent (a separate process) serving kernel-sim consumers against independent TLS
stacks in other processes: OpenSSL's and GnuTLS's command-line peers, both roles, each kTLS
cipher, application data both ways through kernel-sim's kTLS record layer."""

from __future__ import annotations

import socket

import pytest

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import (
    Agent,
    client_handshake,
    recv_app_data,
    start_peer,
    start_server,
)

pytestmark = pytest.mark.sim

SUITES = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_AES_128_CCM_SHA256": "AES-128-CCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
}


def _gnutls_priority(cipher: str) -> str:
    return f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{cipher}"


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("tickets", [0, 2])
def test_agent_client_against_openssl_server(kernel: Kernel, agent: Agent, pki: PKI,
                                             suite: str, tickets: int) -> None:
    peer, port = start_server(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3",
        "-ciphersuites", suite, "-cert", str(pki.server.cert), "-key",
        str(pki.server.key), "-rev", "-num_tickets", str(tickets)])
    try:
        consumer, outcome, sock = client_handshake(kernel, port, "localhost")
        assert outcome.status == 0, agent.log[-5:]
        assert consumer.ktls is not None
        consumer.ktls.sendmsg(b"hello from the kernel\n")
        reply, skipped = recv_app_data(consumer, len(b"lenrek eht morf olleh\n"))
        assert reply == b"lenrek eht morf olleh\n"
        assert skipped == tickets  # the peer's NewSessionTickets reached the kernel, unread
        kernel.sock_release(sock)
    finally:
        peer.close()
    assert f"cipher={suite}" in agent.log[-1]


@pytest.mark.parametrize("suite", SUITES)
def test_agent_server_against_openssl_client(kernel: Kernel, agent: Agent, pki: PKI,
                                             suite: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = start_peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                           "-ciphersuites", suite, "-CAfile", str(pki.ca), "-verify_return_error",
                           "-verify_hostname", "localhost", "-cert", str(pki.client.cert),
                           "-key", str(pki.client.key), "-quiet"])
        try:
            conn, _ = listener.accept()
            consumer = TLSConsumer(kernel)
            outcome = consumer.server(conn)
            assert outcome.status == 0, agent.log[-5:]
            assert outcome.peerid != 0  # the verified client certificate's key
            peer.write(b"ping from openssl\n")
            data, _ = recv_app_data(consumer, len(b"ping from openssl\n"))
            assert data == b"ping from openssl\n"
            assert consumer.ktls is not None
            consumer.ktls.sendmsg(b"pong from the kernel\n")
            assert b"pong from the kernel\n" in peer.read_until(b"pong from the kernel\n")
            kernel.sock_release(conn)
        finally:
            peer.close()
    assert f"cipher={suite}" in agent.log[-1]


@pytest.mark.parametrize("suite", SUITES)
def test_agent_client_against_gnutls_server(kernel: Kernel, agent: Agent, pki: PKI,
                                            suite: str) -> None:
    peer, port = start_server(lambda port: [
        "gnutls-serv", "--echo", "-p", str(port), "--x509certfile",
        str(pki.server.cert), "--x509keyfile", str(pki.server.key),
        "--priority", _gnutls_priority(SUITES[suite])])
    try:
        consumer, outcome, sock = client_handshake(kernel, port, "server.test")
        assert outcome.status == 0, agent.log[-5:]
        assert consumer.ktls is not None
        message = b"echo me through gnutls " * 100 + b"\n"
        consumer.ktls.sendmsg(message)
        data, _ = recv_app_data(consumer, len(message))
        assert data == message
        kernel.sock_release(sock)
    finally:
        peer.close()
    assert f"cipher={suite}" in agent.log[-1]


@pytest.mark.parametrize("suite", SUITES)
def test_agent_server_against_gnutls_client(kernel: Kernel, agent: Agent, pki: PKI,
                                            suite: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        peer = start_peer(["gnutls-cli", "-p", str(port), "localhost", "--x509cafile",
                           str(pki.ca), "--x509certfile", str(pki.client.cert), "--x509keyfile",
                           str(pki.client.key), "--priority", _gnutls_priority(SUITES[suite])])
        try:
            conn, _ = listener.accept()
            consumer = TLSConsumer(kernel)
            outcome = consumer.server(conn)
            assert outcome.status == 0, agent.log[-5:]
            peer.read_until(b"Handshake was completed")
            peer.write(b"ping from gnutls\n")
            data, _ = recv_app_data(consumer, len(b"ping from gnutls\n"))
            assert data == b"ping from gnutls\n"
            assert consumer.ktls is not None
            consumer.ktls.sendmsg(b"pong from the kernel\n")
            assert b"pong from the kernel" in peer.read_until(b"pong from the kernel")
            kernel.sock_release(conn)
        finally:
            peer.close()
    assert f"cipher={suite}" in agent.log[-1]
