"""Operating the agent: reload under load, status, metrics, the log line, and no secret in
the logs at the highest debug level."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from OpenSSL import SSL

import tlshd
from kernel_sim.consumer import TLSConsumer
from kernel_sim.kernel import Kernel
from kernel_sim.nvme import NVMeKeyring, psk_identity
from kernel_sim.tls_ulp import SOL_TLS, TLS_RX, TLS_TX, parse_crypto_info
from tests.pki import PKI
from tests.sim.harness import (
    free_port,
    pair,
    start_agent,
    unique_endpoint,
    write_config,
)

pytestmark = pytest.mark.sim


def _status(config: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "tlshd", "status", "--json", "-c", str(config)],
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _server_key_type(port: int, pki: PKI) -> str:
    """The server certificate's key type as an independent client (openssl) sees it."""
    done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                           "-CAfile", str(pki.ca), "-cert", str(pki.client.cert), "-key",
                           str(pki.client.key)], input="", capture_output=True, text=True,
                          timeout=20, check=False)
    match = re.search(r"Server public key is \d+ bit|Peer signature type: (\S+)", done.stdout)
    return done.stdout if match is None else match.group(0)


def _agent_server_for_openssl(kernel: Kernel, pki: PKI) -> str:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        box: dict[str, str] = {}
        peer = threading.Thread(target=lambda: box.update(key=_server_key_type(port, pki)))
        peer.start()
        conn, _ = listener.accept()
        TLSConsumer(kernel).server(conn)
        peer.join(20)
        kernel.sock_release(conn)
    return box["key"]


def test_reload_under_load_with_bad_then_good_configuration(pki: PKI, tmp_path: Path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint, workers=2)
        agent = start_agent(kernel, config, workers=2)
        stop, results = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                results.append(pair(kernel))

        loaders = [threading.Thread(target=load) for _ in range(3)]
        try:
            for thread in loaders:
                thread.start()
            before = _agent_server_for_openssl(kernel, pki)
            good = config.read_text()
            config.write_text(good + "\n[authenticate.server]\nthis line is broken\n")
            agent.proc.send_signal(signal.SIGHUP)
            assert kernel.wait_for(lambda: any("reload failed" in x for x in agent.log), 10)
            time.sleep(0.5)
            config.write_text(good.replace(str(pki.server.cert), str(pki.server_rsa.cert))
                              .replace(str(pki.server.key), str(pki.server_rsa.key)))
            agent.proc.send_signal(signal.SIGHUP)
            assert kernel.wait_for(lambda: any("reloaded" in x for x in agent.log), 10)
            time.sleep(1.0)
            after = _agent_server_for_openssl(kernel, pki)
        finally:
            stop.set()
            for thread in loaders:
                thread.join(30)
        doc = _status(config)
        assert agent.stop() == 0
    assert "reload failed" in "\n".join(agent.log) and "line" in "\n".join(agent.log)
    assert len(results) > 20 and all(r == (0, 0) for r in results), results[:5]
    assert before != after and "RSA" in after  # the new certificate is in use
    assert doc["reloads"] == 1 and doc["reload_failures"] == 1


def test_handshake_in_flight_during_reload_finishes_with_what_it_started_with(pki, tmp_path):
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint)
        agent = start_agent(kernel, config)
        try:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                client = socket.create_connection(listener.getsockname())
                conn, _ = listener.accept()
            box: dict[str, object] = {}
            server = threading.Thread(target=lambda: box.update(
                out=TLSConsumer(kernel).server(conn)))
            server.start()
            assert kernel.wait_for(lambda: kernel.events("cmd_accept"), 10)
            config.write_text(config.read_text().replace(str(pki.server.cert),
                                                         str(pki.server_rsa.cert))
                              .replace(str(pki.server.key), str(pki.server_rsa.key)))
            agent.proc.send_signal(signal.SIGHUP)
            assert kernel.wait_for(lambda: any("reloaded" in x for x in agent.log), 10)
            peer_key = _pyopenssl_client_key_type(client, pki)  # now the handshake goes on
            server.join(20)
            assert box["out"].status == 0  # type: ignore[attr-defined]
            assert peer_key == "EC"  # the certificate of the configuration it started with
            kernel.sock_release(conn)
            client.close()
        finally:
            assert agent.stop() == 0


def _pyopenssl_client_key_type(sock: socket.socket, pki: PKI) -> str:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(pki.ca))
    ctx.use_certificate_file(str(pki.client.cert))
    ctx.use_privatekey_file(str(pki.client.key))
    tls = SSL.Connection(ctx, sock)
    sock.setblocking(True)  # pyOpenSSL on a socket with a timeout raises WantReadError
    tls.set_connect_state()
    tls.do_handshake()
    cert = tls.get_peer_certificate(as_cryptography=True)
    return type(cert.public_key()).__name__.replace("_", "").upper()[:2]


def test_status_and_metrics_after_real_handshakes(pki, tmp_path):
    port = free_port()
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint,
                              extra=f"metrics=127.0.0.1:{port}\n")
        agent = start_agent(kernel, config)
        try:
            assert pair(kernel) == (0, 0)
            assert pair(kernel) == (0, 0)
            with socket.create_server(("127.0.0.1", 0)) as silent:  # a failure: wrong name
                client = socket.create_connection(silent.getsockname())
                peer, _ = silent.accept()
                out = TLSConsumer(kernel, timeout_ms=500).client(client, peername="localhost")
                kernel.sock_release(client)
                peer.close()
            assert out.status != 0
            doc = _status(config)
            text = subprocess.run([sys.executable, "-m", "tlshd", "status", "-c", str(config)],
                                  capture_output=True, text=True, timeout=20, check=True).stdout
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        finally:
            assert agent.stop() == 0
    counts = {(h["role"], h["auth"], h["result"]): h["count"] for h in doc["handshakes"]}
    assert counts[("client", "X509", "ok")] == 2 and counts[("server", "X509", "ok")] == 2
    assert counts[("client", "X509", "failed")] == 1
    assert doc["done_statuses"] == {"OK": 4, "ETIMEDOUT": 1} and doc["in_flight"] == 0
    assert doc["recent_failures"][-1]["status"] == 110
    assert "ETIMEDOUT" in text and "client  X509" in text
    metrics = body.decode()
    assert 'tlshd_handshakes_total{auth="X509",result="ok",role="client"} 2.0' in metrics
    assert 'tlshd_done_status_total{status="ETIMEDOUT"} 1.0' in metrics
    assert "tlshd_handshake_duration_seconds_bucket" in metrics
    assert "tlshd_in_flight 0.0" in metrics
    # prometheus-client's standard collectors and the build info
    assert "process_resident_memory_bytes " in metrics
    assert "process_cpu_seconds_total " in metrics
    assert "python_info{" in metrics
    assert f'version="{tlshd.__version__}"' in metrics.split("tlshd_build_info{", 1)[1]
    line = next(x for x in agent.log if "role=client" in x and "status=0" in x)
    assert re.search(r"netns=\S+ role=client auth=X509 peer=localhost addr=127\.0\.0\.1:\d+ "
                     r"status=0 [\d.]+ms ok cipher=TLS_\w+ subject='CN=", line), line


def test_no_key_material_in_logs_at_the_highest_debug_level(pki, tmp_path):
    ring = NVMeKeyring.create()
    psk = os.urandom(48)
    ring.add_psk(psk_identity("scan-host", "scan-subsys", 2), psk)
    installed: list[bytes] = []
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint)
        config.write_text("[debug]\nloglevel=7\ntls=99\nnl=99\n\n" + config.read_text())
        agent = start_agent(kernel, config)
        try:
            installed += _x509_pair_keys(kernel)
            installed += _psk_pair_keys(kernel, ring)
        finally:
            assert agent.stop() == 0
            ring.close()
    log = "\n".join(agent.log)
    assert "DONE seq=" in log and "read " in log  # the debug levels are really on
    secrets = [psk, pki.client.key_der, pki.server.key_der, *installed]
    for secret in secrets:
        for needle in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1][:40]):
            assert needle not in log
    for pem in (pki.client.key.read_text(), pki.server.key.read_text()):
        body = "".join(pem.strip().splitlines()[1:-1])
        assert body[:40] not in log.replace("\n", "")


def _installed_keys(kernel: Kernel, sock: socket.socket) -> list[bytes]:
    """The key, iv and salt kernel-sim's ULP received: they must not be in any log."""
    ulp = kernel.netns_of(sock).ulp
    out = []
    for optname in (TLS_TX, TLS_RX):
        info = parse_crypto_info(_full_info(ulp, sock, optname))
        out += [info.key, info.iv + info.salt]
    return out


def _full_info(ulp, sock, optname) -> bytes:
    for size in (40, 56):
        try:
            return ulp.getsockopt(sock, SOL_TLS, optname, size)
        except OSError:
            continue
    raise AssertionError("no crypto_info")


def _x509_pair_keys(kernel: Kernel) -> list[bytes]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.update(s=TLSConsumer(kernel).server(server)
                                                        .status))
    thread.start()
    assert TLSConsumer(kernel).client(client, peername="localhost").status == 0
    thread.join(20)
    keys = _installed_keys(kernel, client) + _installed_keys(kernel, server)
    kernel.sock_release(client)
    kernel.sock_release(server)
    return keys


def _psk_pair_keys(kernel: Kernel, ring: NVMeKeyring) -> list[bytes]:
    from kernel_sim.nvme import NVMeHost, NVMeTarget

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    target = NVMeTarget(kernel, keyring=ring.serial)
    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.update(s=target.handshake(server).status))
    thread.start()
    host = NVMeHost(kernel, hostnqn="scan-host", subnqn="scan-subsys", keyring=ring.serial)
    assert host.connect(client).status == 0
    thread.join(20)
    keys = _installed_keys(kernel, client) + _installed_keys(kernel, server)
    kernel.sock_release(client)
    kernel.sock_release(server)
    return keys


def test_sigusr1_reloads_like_sighup(pki, tmp_path):
    # ktls-utils 1.4.0 src/tlshd/netlink.c: "SIGHUP and SIGUSR1 trigger configuration reload";
    # before this, SIGUSR1's default action killed the agent (exit by signal 10).
    with Kernel(endpoint=unique_endpoint()) as kernel:
        kernel.add_netns(None)
        config = write_config(tmp_path, pki, kernel.endpoint)
        agent = start_agent(kernel, config)
        try:
            agent.proc.send_signal(signal.SIGUSR1)
            assert kernel.wait_for(lambda: any("reloaded" in x for x in agent.log), 10)
            assert agent.proc.poll() is None
            assert pair(kernel) == (0, 0)
            doc = _status(config)
        finally:
            code = agent.stop()
    assert doc["reloads"] == 1 and code == 0
