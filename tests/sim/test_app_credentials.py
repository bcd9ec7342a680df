"""Per-rule credentials for applications (issue 17: "nothing leaks across uids"): a policy
rule names ``[app.credentials.NAME]``, and only the requests that rule matches, judged by the
uid the kernel vouches for, use them. The request itself cannot choose."""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI, issue_leaf, write_issued
from tests.sim.harness import start_agent, unique_endpoint, write_config
from tlshd.app import SecureSocketError, secure_client

pytestmark = pytest.mark.sim

POLICY = """\
rules:
  root-gets-alpha:
    match: {users: [root], direction: outbound, remote_ports: ["%(port)d"]}
    action: {credentials: alpha}
  nobody-gets-beta:
    match: {users: [nobody], direction: outbound, remote_ports: ["%(port)d"]}
    action: {credentials: beta}
  root-to-the-other-port:
    match: {users: [root], direction: outbound}
    action: {credentials: missing}
"""

AS_NOBODY = """
import json, os, socket, sys
from tlshd.app import SecureSocketError, secure_client
port, endpoint = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port))
os.setgid(65534); os.setuid(65534)
# a caller that tries to pick another rule's credentials: those fields mean nothing
from tlshd.app import _ask
secured = _ask(sock, {"role": "client", "server_name": "localhost", "credentials": "alpha",
                      "profile": "alpha"}, 10_000, endpoint, None)
print(secured.peer, flush=True)
"""


def _server(pki: PKI, count: int) -> tuple[int, list[str], threading.Thread]:
    """A TLS server that requires a client certificate and answers each client with the
    common name it presented."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def serve() -> None:
        with listener:
            for _ in range(count):
                conn, _ = listener.accept()
                try:
                    tls = context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    seen.append(f"failed: {exc}")
                    continue
                with tls, contextlib.suppress(ssl.SSLError, OSError):
                    subject = dict(x[0] for x in tls.getpeercert()["subject"])
                    seen.append(subject["commonName"])
                    tls.recv(1)
                    tls.sendall(subject["commonName"].encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def _config(kernel: Kernel, pki: PKI, tmp_path: Path, port: int) -> tuple[Path, str]:
    beta = write_issued(tmp_path, "beta", issue_leaf(pki.ca_issued, "beta.test",
                                                     dns=["beta.test"], client=True))
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "rules.yml").write_text(POLICY % {"port": port})
    endpoint = f"tlshd-test-app/{kernel.endpoint}"
    extra = (
        f"\n[app]\nenabled=true\nsocket={endpoint}\npolicy_dir={policy_dir}\n\n"
        f"[app.credentials.alpha]\nx509.certificate={pki.client.cert}\n"
        f"x509.private_key={pki.client.key}\nx509.truststore={pki.ca}\n\n"
        f"[app.credentials.beta]\nx509.certificate={beta.cert}\n"
        f"x509.private_key={beta.key}\nx509.truststore={pki.ca}\n\n[agent]\n")
    # the [authenticate.client] credentials have no certificate: nothing to fall back to
    return write_config(tmp_path, pki, kernel.endpoint, client_cert=False, extra=extra), \
        endpoint


def test_each_uid_gets_the_credentials_its_rule_names_and_no_other(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        port, seen, thread = _server(pki, 2)
        config, endpoint = _config(kernel, pki, tmp_path, port)
        agent = start_agent(kernel, config)
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            kernel.adopt(sock)
            secure_client(sock, server_name="localhost", endpoint=endpoint)
            kernel.ktls(sock).sendmsg(b"x")
            assert kernel.ktls(sock).recvmsg(100) == (23, b"client.test")
            done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(port), endpoint],
                                  capture_output=True, text=True, timeout=60, check=False)
            thread.join(10)
            assert done.stdout.strip() == "CN=server.test,O=tlshd tests", done.stderr
            assert seen == ["client.test", "beta.test"], (seen, done.stderr)
            log = "\n".join(agent.log)
            assert "rule=root-gets-alpha credentials=alpha" in log
            assert "rule=nobody-gets-beta credentials=beta" in log
            kernel.sock_release(sock)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)


def test_a_rule_naming_credentials_that_are_not_configured_is_refused(
        pki: PKI, tmp_path: Path) -> None:
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        port, _, _ = _server(pki, 1)
        config, endpoint = _config(kernel, pki, tmp_path, port)
        agent = start_agent(kernel, config)
        try:
            with socket.create_server(("127.0.0.1", 0)) as other:
                sock = socket.create_connection(other.getsockname())  # the third rule
                with sock, pytest.raises(SecureSocketError) as info:
                    secure_client(sock, server_name="localhost", endpoint=endpoint)
            assert info.value.errno == errno.EACCES
            assert "names credentials missing" in "\n".join(agent.log)
        finally:
            assert agent.stop() == 0, "\n".join(agent.log)
