"""Every failure ends in exactly one DONE with the right status, the consumer sees it, and
the agent goes on serving the next request."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import (
    Peer,
    client_handshake,
    recv_app_data,
    start_agent,
    start_peer,
    start_server,
    unique_endpoint,
    write_config,
)

pytestmark = pytest.mark.sim


def _s_server(pki: PKI, cert: Path, key: Path, *extra: str) -> tuple[Peer, int]:
    return start_server(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
        "-key", str(key), "-rev", "-num_tickets", "0", *extra])


@pytest.fixture(scope="module")
def good_server(pki: PKI) -> Iterator[int]:
    peer, port = _s_server(pki, pki.server.cert, pki.server.key, "-tls1_3")
    yield port
    peer.close()


def assert_agent_serves(kernel: Kernel, port: int) -> None:
    consumer, outcome, sock = client_handshake(kernel, port, "localhost")
    assert outcome.status == 0
    assert consumer.ktls is not None
    consumer.ktls.sendmsg(b"still here\n")
    assert recv_app_data(consumer, 11)[0] == b"ereh llits\n"
    kernel.sock_release(sock)


def _fails_against_s_server(kernel: Kernel, pki: PKI, cert: Path, key: Path,
                            peername: str = "localhost", *extra: str) -> int:
    peer, port = _s_server(pki, cert, key, *extra)
    try:
        _consumer, outcome, sock = client_handshake(kernel, port, peername)
        kernel.sock_release(sock)
        return outcome.status
    finally:
        peer.close()


def test_server_certificate_from_an_untrusted_ca_is_eacces(kernel, agent, pki, good_server):
    status = _fails_against_s_server(kernel, pki, pki.untrusted_server.cert,
                                     pki.untrusted_server.key)
    assert status == -errno.EACCES
    assert "certificate" in agent.log[-1] and "status=13" in agent.log[-1]
    assert_agent_serves(kernel, good_server)


@pytest.mark.parametrize("peername", ["wrong.example", "192.0.2.1"])
def test_server_certificate_for_another_name_is_eacces(kernel, agent, pki, good_server,
                                                        peername):
    status = _fails_against_s_server(kernel, pki, pki.server.cert, pki.server.key, peername)
    assert status == -errno.EACCES
    assert_agent_serves(kernel, good_server)


def test_expired_server_certificate_is_eacces(kernel, agent, pki, good_server):
    status = _fails_against_s_server(kernel, pki, pki.expired_server.cert,
                                     pki.expired_server.key)
    assert status == -errno.EACCES
    assert "expired" in agent.log[-1]
    assert_agent_serves(kernel, good_server)


def test_peer_that_speaks_only_tls_1_2_is_eacces(kernel, agent, pki, good_server):
    status = _fails_against_s_server(kernel, pki, pki.server.cert, pki.server.key, "localhost",
                                     "-tls1_2")
    assert status == -errno.EACCES
    assert_agent_serves(kernel, good_server)


def _misbehaving_server(behave: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                behave(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_peer_sending_garbage_is_eacces(kernel, agent, good_server):
    def garbage(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(os.urandom(64) + b"this is not TLS" * 20)
        time.sleep(1)

    port, thread = _misbehaving_server(garbage)
    _consumer, outcome, sock = client_handshake(kernel, port)
    assert outcome.status == -errno.EACCES
    kernel.sock_release(sock)
    thread.join(5)
    assert_agent_serves(kernel, good_server)


def test_peer_closing_mid_handshake_is_etimedout(kernel, agent, good_server):
    # ktls-utils b010190: a premature close asks the kernel to retry (ETIMEDOUT)
    def read_hello_then_close(conn: socket.socket) -> None:
        time.sleep(0.2)
        conn.recv(65536)  # all of the ClientHello: the close is a FIN, not a reset

    port, thread = _misbehaving_server(read_hello_then_close)
    _consumer, outcome, sock = client_handshake(kernel, port)
    assert outcome.status == -errno.ETIMEDOUT
    assert "closed" in agent.log[-1]
    kernel.sock_release(sock)
    thread.join(5)
    assert_agent_serves(kernel, good_server)


def test_peer_that_never_answers_times_out_at_the_accept_timeout(kernel, agent, good_server):
    stop = threading.Event()
    port, thread = _misbehaving_server(lambda conn: stop.wait(10))
    started = time.monotonic()
    _consumer, outcome, sock = client_handshake(kernel, port, timeout_ms=1500, timeout_s=10)
    elapsed = time.monotonic() - started
    stop.set()
    assert outcome.status == -errno.ETIMEDOUT
    assert 1.4 < elapsed < 5, "the agent's DONE, not the consumer's own 10 s timer"
    kernel.sock_release(sock)
    thread.join(5)
    assert_agent_serves(kernel, good_server)


def test_application_data_right_after_finished_stays_for_the_kernel(kernel, agent, pki):
    """The client sends its Finished and application data in one segment; the agent (server)
    must stop reading at the end of the Finished record, so kTLS gets the data."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(pki.ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    consumer = TLSConsumer(kernel)
    result: dict[str, object] = {}
    server = threading.Thread(target=lambda: result.update(out=consumer.server(conn)))
    server.start()
    tls = SSL.Connection(ctx, None)
    tls.set_connect_state()
    _pyopenssl_handshake(tls, client)
    tls.send(b"early application data")
    client.sendall(tls.bio_read(65536))  # Finished (already sent) + data: data right behind it
    server.join(10)
    assert result["out"].status == 0  # type: ignore[attr-defined]
    data, _ = recv_app_data(consumer, len(b"early application data"))
    assert data == b"early application data"
    kernel.sock_release(conn)
    client.close()


def _pyopenssl_handshake(tls: SSL.Connection, sock: socket.socket) -> None:
    """Drive a pyOpenSSL client over ``sock``; its last flight is left in the BIO."""
    sock.settimeout(10)
    while True:
        try:
            tls.do_handshake()
            return
        except SSL.WantReadError:
            pending = tls.bio_read(65536) if tls.want_read() else b""
            if pending:
                sock.sendall(pending)
            tls.bio_write(sock.recv(65536))


def test_missing_client_certificate_where_required_is_eacces(pki, tmp_path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent = start_agent(kernel, write_config(tmp_path, pki, kernel.endpoint,
                                                 require_client_cert=True))
        try:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                port = listener.getsockname()[1]
                peer = start_peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                   "-tls1_3", "-CAfile", str(pki.ca), "-quiet"])
                conn, _ = listener.accept()
                outcome = TLSConsumer(kernel).server(conn)
                peer.close()
            assert outcome.status == -errno.EACCES
            assert "status=13" in agent.log[-1]
            kernel.sock_release(conn)
        finally:
            assert agent.stop() == 0
