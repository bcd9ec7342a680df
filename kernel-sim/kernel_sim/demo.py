"""``kernel-sim demo`` (and ``tlshd demo``): kernel-sim plus an agent, doing real handshakes.

For a machine whose kernel has no ``handshake`` family: it starts kernel-sim
in this process, writes a throwaway CA and certificates and a configuration
in the reference agent's format, starts the agent (``python -m tlshd``, or any
command given) as a separate process on the simulator's endpoint, and runs an NFS-style client
and server consumer over loopback: an ``xprtsec=tls`` mount, an
``xprtsec=mtls`` mount, and RPC calls over the kTLS record layer.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from kernel_sim.kernel import Kernel


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_demo_pki(directory: Path) -> dict[str, Path]:
    """CA, server (localhost, 127.0.0.1) and client certificates as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("tlshd demo CA", ca_key, "tlshd demo CA", ca_key, ca=True)
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    sans: dict[str, list[x509.GeneralName]] = {"server": [x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            "client": [x509.DNSName("client.demo")]}
    for role, names in sans.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"tlshd demo {role}", key, "tlshd demo CA", ca_key, ca=False, sans=names)
        files[f"{role}_cert"] = directory / f"{role}.pem"
        files[f"{role}_key"] = directory / f"{role}.key"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(files[f"{role}_key"], 0o600)
    return files


def write_demo_config(directory: Path, pki: dict[str, Path], endpoint: str, *,
                      workers: int = 1) -> Path:
    text = f"""# tlshd demo configuration (reference agent format)
[debug]
loglevel=0

[authenticate.client]
x509.truststore={pki['ca']}
x509.certificate={pki['client_cert']}
x509.private_key={pki['client_key']}

[authenticate.server]
x509.truststore={pki['ca']}
x509.certificate={pki['server_cert']}
x509.private_key={pki['server_key']}

[agent]
workers={workers}
upcall=kernel-sim:{endpoint}
control_socket=tlshd-demo/{endpoint}
"""
    path = directory / "config"
    path.write_text(text)
    return path


DEFAULT_AGENT = (sys.executable, "-m", "tlshd")


def start_agent(config: Path, *extra: str, stderr: IO[str] | None = None,
                agent: Sequence[str] = DEFAULT_AGENT) -> subprocess.Popen[bytes]:
    """The agent under test as its own process: it shares nothing with kernel-sim but the
    endpoint (it is told with ``-c``, in the reference agent's option syntax)."""
    return subprocess.Popen([*agent, "-s", "-c", str(config), *extra],
                            stdin=subprocess.DEVNULL, stderr=stderr)


def _mount(kernel: Kernel, xprtsec: str, calls: int) -> str:
    from kernel_sim.consumer import NFSClient, NFSServer

    listener = socket.create_server(("127.0.0.1", 0))
    server = NFSServer(kernel, xprtsec=xprtsec)
    client = NFSClient(kernel, xprtsec=xprtsec)
    result: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        result["server"] = server.handshake(conn)
        result["served"] = server.serve(conn, calls)
        kernel.sock_release(conn)

    thread = threading.Thread(target=serve)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    outcome = client.mount(sock, "localhost")
    replies = [client.null_call(xid) for xid in range(100, 100 + calls)] if outcome.status == 0 \
        else []
    client.close()
    thread.join(timeout=30)
    listener.close()
    server_outcome = result.get("server")
    server_status = server_outcome[0].status if isinstance(server_outcome, tuple) else "?"
    peer_auth = server_outcome[1] if isinstance(server_outcome, tuple) else False
    return (f"xprtsec={xprtsec}: client status={outcome.status} "
            f"({outcome.seconds * 1000:.1f} ms), server status="
            f"{server_status} peer_authenticated={peer_auth}, "
            f"{len(replies)} RPC NULL calls answered over kTLS")


def run_demo(agent: Sequence[str] = DEFAULT_AGENT) -> int:
    from kernel_sim.kernel import Kernel

    endpoint = f"tlshd-demo-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="tlshd-demo-") as tmp, Kernel(endpoint=endpoint) as k:
        k.add_netns(None)
        config = write_demo_config(Path(tmp), write_demo_pki(Path(tmp)), endpoint)
        print(f"kernel-sim: endpoint {endpoint!r}; agent config {config}", flush=True)
        proc = start_agent(config, agent=agent)
        try:
            ns = k.netns_of(socket.socket())
            if not k.wait_for(lambda: k.listeners(ns) > 0, timeout=20):
                print("demo: the agent did not join the tlshd group", file=sys.stderr)
                return 1
            for xprtsec in ("tls", "mtls"):
                print(_mount(k, xprtsec, calls=3), flush=True)
            time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=40)
        print(f"agent stopped with status {proc.returncode}")
    return 0
