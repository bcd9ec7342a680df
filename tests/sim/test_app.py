"""Secure sockets for applications (issue 17, step 1) through kernel-sim: a process hands its
own connected TCP socket to the agent (tlshd.app), the agent runs the handshake with its
configured credentials and installs kTLS on that socket, and the process then moves bulk data
over it. kernel-sim plays the kernel for the application's sockets (Kernel.adopt)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import Agent, start_agent, unique_endpoint, write_config
from tlshd.app import Secured, SecureSocketError, secure_client, secure_server

pytestmark = pytest.mark.sim


def app_agent(kernel: Kernel, pki: PKI, tmp_path: Path, *, privsep: bool = True,
              allow: str = "root", policy: str = "") -> tuple[Agent, str]:
    endpoint = f"tlshd-test-app/{kernel.endpoint}"
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir(exist_ok=True)
    if policy:
        (policy_dir / "rules.yml").write_text(policy)
    config = write_config(tmp_path, pki, kernel.endpoint, extra=(
        f"privsep={'true' if privsep else 'false'}\n\n[app]\nenabled=true\n"
        f"socket={endpoint}\nallow_users={allow}\npolicy_dir={policy_dir}\n\n[agent]\n"))
    return start_agent(kernel, config), endpoint


def tcp_pair(kernel: Kernel) -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    kernel.adopt(client)
    kernel.adopt(server)
    return client, server


def secure_pair(kernel: Kernel, endpoint: str, name: str = "localhost"
                ) -> tuple[socket.socket, socket.socket, Secured, Secured]:
    client, server = tcp_pair(kernel)
    box: dict[str, object] = {}

    def serve() -> None:
        try:
            box["server"] = secure_server(server, endpoint=endpoint)
        except SecureSocketError as exc:
            box["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result = secure_client(client, server_name=name, endpoint=endpoint)
    finally:
        thread.join(20)
    served = box["server"]
    if isinstance(served, Exception):
        raise served
    assert isinstance(served, Secured)
    return client, server, result, served


@pytest.mark.parametrize("privsep", [True, False], ids=["privsep", "no-privsep"])
def test_an_application_gets_ktls_on_its_own_socket_and_bulk_data_crosses_byte_exact(
        pki: PKI, tmp_path: Path, privsep: bool) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path, privsep=privsep)
        try:
            client, server, result, served = secure_pair(kernel, endpoint)
            assert result.peer == "CN=server.test,O=tlshd tests"  # the verified server
            assert served.peer == "CN=client.test,O=tlshd tests"  # the agent's client cert
            assert result.cipher.startswith("TLS_") and result.cipher == served.cipher
            up, down = os.urandom(1 << 20), os.urandom(300_000)
            client_tls, server_tls = kernel.ktls(client), kernel.ktls(server)
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(_read(server_tls, len(up))))
            reader.start()
            _write(client_tls, up)
            reader.join(30)
            assert got == [up]
            writer = threading.Thread(target=_write, args=(server_tls, down))
            writer.start()
            assert _read(client_tls, len(down)) == down
            writer.join(30)
            assert any("application request: client" in line for line in agent.log)
            assert any("role=client" in line and " status=0 " in line and " app_pid=" in line
                       for line in agent.log)
            kernel.sock_release(client)
            kernel.sock_release(server)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def _write(tls: object, data: bytes) -> None:
    for at in range(0, len(data), 16384):
        tls.sendmsg(data[at:at + 16384])  # type: ignore[attr-defined]


def _read(tls: object, size: int) -> bytes:
    out = b""
    while len(out) < size:
        _, chunk = tls.recvmsg(65536)  # type: ignore[attr-defined]
        assert chunk, "EOF"
        out += chunk
    return out


def test_a_wrong_server_name_fails_the_request_with_eacces_and_the_agent_serves_on(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path)
        try:
            with pytest.raises(SecureSocketError) as info:
                secure_pair(kernel, endpoint, name="other.test")
            assert info.value.errno == errno.EACCES
            secure_pair(kernel, endpoint)  # the next one succeeds
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_a_uid_that_is_not_allowed_gets_eacces_and_no_handshake(pki: PKI, tmp_path: Path) -> None:
    script = (
        "import errno, os, socket, sys\n"
        "from tlshd.app import secure_client, SecureSocketError\n"
        "l = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(l.getsockname())\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    secure_client(c, server_name='localhost', endpoint=sys.argv[1])\n"
        "except SecureSocketError as e:\n"
        "    print('errno', e.errno, e.strerror)\n"
    )
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path)
        try:
            done = subprocess.run([sys.executable, "-c", script, endpoint], capture_output=True,
                                  text=True, timeout=60, check=False)
            assert done.stdout.startswith(f"errno {errno.EACCES} uid 65534 may not ask"), (
                done.stdout + done.stderr)
            assert not any("role=client" in line for line in agent.log)  # no handshake ran
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_without_an_agent_the_request_fails_with_econnrefused() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(SecureSocketError) as info:
        secure_client(a, endpoint=f"tlshd-test-app/none-{os.getpid()}")
    assert info.value.errno == errno.ECONNREFUSED


def _tls_server(pki: PKI, behave) -> tuple[int, threading.Thread]:
    """A Python ssl (OpenSSL) TLS 1.3 server on loopback that sends its default two
    NewSessionTickets after the handshake, then runs ``behave(conn)``."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.server.cert, pki.server.key)
    assert context.num_tickets == 2
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                behave(tls)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _client_to(kernel: Kernel, endpoint: str, port: int) -> tuple[socket.socket, Secured]:
    sock = socket.create_connection(("127.0.0.1", port))
    kernel.adopt(sock)
    return sock, secure_client(sock, server_name="localhost", endpoint=endpoint)


def test_the_servers_tickets_never_reach_the_application(pki: PKI, tmp_path: Path) -> None:
    """kTLS hands a plain read() a non-data record as EIO: the agent reads the server's
    NewSessionTickets itself before it hands the socket back, and kTLS starts after them."""
    def echo(tls) -> None:
        tls.sendall(tls.recv(100)[::-1])

    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path)
        try:
            port, thread = _tls_server(pki, echo)
            sock, result = _client_to(kernel, endpoint, port)
            assert result.data == b""
            tls = kernel.ktls(sock)
            tls.sendmsg(b"hello, server")
            record_type, data = tls.recvmsg(100)
            assert (record_type, data) == (23, b"revres ,olleh")  # data, not a ticket
            thread.join(10)
            assert any("post_handshake_records=2" in line for line in agent.log), agent.log[-3:]
            kernel.sock_release(sock)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_a_server_that_speaks_first_gets_its_first_record_to_the_application(
        pki: PKI, tmp_path: Path) -> None:
    def banner(tls) -> None:
        tls.sendall(b"220 ready\r\n")
        tls.sendall(b"second record\r\n")
        tls.recv(10)

    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path)
        try:
            port, thread = _tls_server(pki, banner)
            sock, result = _client_to(kernel, endpoint, port)
            assert result.data == b"220 ready\r\n"  # read by the agent, in the answer
            tls = kernel.ktls(sock)
            assert tls.recvmsg(100) == (23, b"second record\r\n")  # kTLS from the next one
            tls.sendmsg(b"bye")
            thread.join(10)
            kernel.sock_release(sock)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_policy_rules_decide_by_executable_direction_and_port(pki: PKI, tmp_path: Path) -> None:
    """With rules in [app] policy_dir, they decide instead of allow_users: this test's
    interpreter may be a client to any port, and no rule lets anyone be a server."""
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    rules = (f"rules:\n  tests-as-clients:\n    match: {{direction: outbound, "
             f"executables: ['{exe}'], remote_ports: ['1-65535']}}\n"
             "  nobody-else:\n    match: {users: ['65534']}\n")
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        agent, endpoint = app_agent(kernel, pki, tmp_path, allow="", policy=rules)
        try:
            client, server = tcp_pair(kernel)
            with pytest.raises(SecureSocketError) as refused:
                secure_server(server, endpoint=endpoint)
            assert refused.value.errno == errno.EACCES  # no rule lets it be a server
            assert "no rule allows it" in refused.value.strerror
            with pytest.raises(SecureSocketError) as waited:  # allowed, but no server answers
                secure_client(client, server_name="localhost", timeout_ms=1500,
                              endpoint=endpoint)
            assert waited.value.errno == errno.ETIMEDOUT
            assert any("rule=tests-as-clients" in line for line in agent.log), agent.log[-4:]
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)
